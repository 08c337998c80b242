#!/usr/bin/env bash
# nswrap's design written by hand, minimal: what scripts/bench.py races nswrap against.
#
#   bench_handwritten.sh [-m MARK_MASK] PORT[/udp|/tcp][,...] -- CMD [ARG...]
#
# The same design as one nswrap instance alone on the host (`nswrap --dry-run` prints it):
# the server in its own network namespace behind a veth pair (no IPv6 DAD, permanent
# neighbours); one nft table whose DNAT maps are keyed `uplink . host address . proto . port`,
# whose first packet of a flow records its uplink's mark in the ct mark (a verdict map per
# uplink) and whose every packet of a published flow gets that mark back (a verdict map on the
# ct mark); per uplink one routing table and one fwmark rule per family; the server's subnet
# reached through `to <internal range> lookup main suppress_prefixlength 0`; forwarding and
# src_valid_mark on the uplinks only; a forward guard so that the uplinks forward nothing but
# published flows. Stale conntrack entries of the published ports are deleted at start.
#
# Left out, as a person writing it for this one server would: map counters, host-local and
# loopback clients (output hook, route_localnet), the server's own outbound connections
# (masquerade), the TFTP helper, conntrack timeout policies, the unreachable safety rule, other
# instances, following the host's changes, and the guard's interface tests (its `ct status dnat
# accept` also passes a LAN peer's forged reply that poses as the server: docs/design.md).
# Uplinks: every interface with a global IPv4 address, gateways from the main table; one command
# per line, undone in reverse from an EXIT trap.
# Only for the benchmark lab: it runs in a throwaway namespace, never on a real host.
set -euo pipefail

mask=0xf0000000
if [[ ${1:-} == -m ]]; then mask=$2; shift 2; fi
ports=$1; shift
[[ ${1:-} == -- ]] && shift

id=$$
ns=hw-$id veth=hwv-$id
host4=198.19.255.253 server4=198.19.255.254
host6=fd6e:7377:7261:ffff::1 server6=fd6e:7377:7261:ffff::2
first_table=5100 rule_priority=5100
shift_bits=0
while (( (mask >> shift_bits & 1) == 0 )); do shift_bits=$((shift_bits + 1)); done
keep=$(printf '0x%08x' $(( ~mask & 0xffffffff )))
mask=$(printf '0x%08x' "$mask")

undo=()
rollback() {
    local i
    for ((i = ${#undo[@]} - 1; i >= 0; i--)); do eval "${undo[i]}" >/dev/null 2>&1 || true; done
    undo=()
}
trap rollback EXIT
trap 'exit 143' TERM INT

sysctl_set() {  # record the old value, then change it
    local key=$1 value=$2 old
    old=$(sysctl -n "$key")
    if [[ $old != "$value" ]]; then
        undo+=("sysctl -qw $key=$old")
        sysctl -qw "$key=$value"
    fi
}

# The server's network.
ip netns add "$ns"
undo+=("ip netns del $ns")
ip link add "$veth" type veth peer name eth0 netns "$ns"
undo+=("ip link del $veth")
ip link set "$veth" addrgenmode none
ip -n "$ns" link set eth0 addrgenmode none
server_mac=$(ip -n "$ns" -br link show eth0 | awk '{print $3}')
host_mac=$(ip -br link show "$veth" | awk '{print $3}')
ip addr add "$host4/30" dev "$veth"
ip -6 addr add "$host6/64" dev "$veth" nodad
ip neigh add "$server4" dev "$veth" lladdr "$server_mac" nud permanent
ip -6 neigh add "$server6" dev "$veth" lladdr "$server_mac" nud permanent
ip link set "$veth" up
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$server4/30" dev eth0
ip -n "$ns" -6 addr add "$server6/64" dev eth0 nodad
ip -n "$ns" neigh add "$host4" dev eth0 lladdr "$host_mac" nud permanent
ip -n "$ns" -6 neigh add "$host6" dev eth0 lladdr "$host_mac" nud permanent
ip -n "$ns" link set eth0 up
ip -n "$ns" route add default via "$host4"
ip -n "$ns" -6 route add default via "$host6"
sysctl_set "net.ipv4.conf.$veth.forwarding" 1
sysctl_set "net.ipv6.conf.$veth.force_forwarding" 1

# Uplinks and the host's addresses.
mapfile -t uplinks < <(ip -4 -o addr show scope global | awk '{print $2}' | grep -v "^$veth$" | awk '!seen[$0]++')
mapfile -t addrs4 < <(ip -4 -o addr show scope global | awk -v v="$veth" '$2 != v {sub(/\/.*/, "", $4); print $4}')
mapfile -t addrs6 < <(ip -6 -o addr show scope global | awk -v v="$veth" '$2 != v {sub(/\/.*/, "", $4); print $4}')

# Routing: the server's subnets through the main table, then one table and rule per uplink.
ip rule add to 198.18.0.0/15 lookup main suppress_prefixlength 0 priority "$rule_priority"
undo+=("ip rule del priority $rule_priority")
ip -6 rule add to fd6e:7377:7261::/48 lookup main suppress_prefixlength 0 priority "$rule_priority"
undo+=("ip -6 rule del priority $rule_priority")
uplink_new="" uplink_flow="" chains=""
for k in "${!uplinks[@]}"; do
    dev=${uplinks[k]} table=$((first_table + k)) mark=$(printf '0x%08x' $(( (k + 1) << shift_bits )))
    undo+=("ip route flush table $table" "ip -6 route flush table $table")
    while read -r dst src; do
        ip route add "$dst" dev "$dev" src "$src" table "$table"
    done < <(ip -4 route show dev "$dev" scope link proto kernel | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $1, $(i + 1)}')
    gw=$(ip -4 route show default dev "$dev" | awk '/via/ {print $3; exit}')
    if [[ -n $gw ]]; then ip route add default via "$gw" dev "$dev" table "$table"; fi
    while read -r dst; do
        ip -6 route add "$dst" dev "$dev" table "$table"
    done < <(ip -6 route show dev "$dev" proto kernel | awk '{print $1}')
    gw6=$(ip -6 route show default dev "$dev" | awk '/via/ {print $3; exit}')
    if [[ -n $gw6 ]]; then ip -6 route add default via "$gw6" dev "$dev" table "$table"; fi
    ip rule add fwmark "$mark/$mask" lookup "$table" priority $((rule_priority + 1))
    undo+=("ip rule del fwmark $mark/$mask lookup $table priority $((rule_priority + 1))")
    ip -6 rule add fwmark "$mark/$mask" lookup "$table" priority $((rule_priority + 1))
    undo+=("ip -6 rule del fwmark $mark/$mask lookup $table priority $((rule_priority + 1))")
    sysctl_set "net.ipv4.conf.$dev.forwarding" 1
    sysctl_set "net.ipv4.conf.$dev.src_valid_mark" 1
    sysctl_set "net.ipv6.conf.$dev.force_forwarding" 1
    uplink_new+="${uplink_new:+, }\"$dev\" : goto new_$k"
    uplink_flow+="${uplink_flow:+, }$mark : goto flow_$k"
    chains+="	chain new_$k { ct mark set ct mark & $keep | $mark; meta mark set meta mark & $keep | $mark; }
	chain flow_$k { meta mark set meta mark & $keep | $mark; }
"
done

# Published elements: every uplink x every host address x every port.
items=()
IFS=, read -ra specs <<<"$ports"
for spec in "${specs[@]}"; do
    port=${spec%/*} proto=udp
    [[ $spec == */tcp ]] && proto=tcp
    items+=("$proto . $port")
done
dnat4="" dnat6=""
for dev in "${uplinks[@]}"; do
    for item in "${items[@]}"; do
        for a in "${addrs4[@]}"; do dnat4+="${dnat4:+, }\"$dev\" . $a . $item : $server4"; done
        for a in "${addrs6[@]}"; do dnat6+="${dnat6:+, }\"$dev\" . $a . $item : $server6"; done
    done
done
names=$(printf '"%s", ' "${uplinks[@]}")
elements6=""
if [[ -n $dnat6 ]]; then elements6="elements = { $dnat6 }"; fi

undo+=("nft delete table inet $ns")
nft -f - <<EOF
table inet $ns {
	map dnat4 { type ifname . ipv4_addr . inet_proto . inet_service : ipv4_addr; elements = { $dnat4 } }
	map dnat6 { type ifname . ipv6_addr . inet_proto . inet_service : ipv6_addr; $elements6 }
	map uplink_new { type ifname : verdict; elements = { $uplink_new } }
	map uplink_flow { type mark : verdict; elements = { $uplink_flow } }
$chains	chain publish {
		type nat hook prerouting priority dstnat; policy accept;
		meta l4proto { udp, tcp } dnat ip to iifname . ip daddr . meta l4proto . th dport map @dnat4
		meta l4proto { udp, tcp } dnat ip6 to iifname . ip6 daddr . meta l4proto . th dport map @dnat6
	}
	chain remember {
		type filter hook prerouting priority dstnat + 1; policy accept;
		ct mark & $mask vmap @uplink_flow
		ct state new ct status dnat iifname vmap @uplink_new
	}
	chain guard {
		type filter hook forward priority filter; policy accept;
		ct status dnat accept
		iifname { ${names%, } } drop
	}
}
EOF

# Flows of the published ports made before the rules existed would bypass them.
for item in "${items[@]}"; do
    conntrack -D -p "${item% . *}" --orig-port-dst "${item#* . }" >/dev/null 2>&1 || true
    conntrack -D -f ipv6 -p "${item% . *}" --orig-port-dst "${item#* . }" >/dev/null 2>&1 || true
done

# The server; a SIGTERM to this script stops it, then the EXIT trap undoes everything.
ip netns exec "$ns" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' TERM INT
status=0
wait "$server" || status=$?
if kill -0 "$server" 2>/dev/null; then wait "$server" || status=$?; fi
exit "$status"
