#!/usr/bin/env bash
# The hand-written equivalent of `nswrap --ports PORTS -- CMD` that scripts/bench.py races against
# nswrap: the same `ip`, sysctl and nft work that `nswrap --dry-run` prints, one command at a time
# as a person would type it, then the same undo in reverse. UDP ports without remapping only.
#
#   bench_handwritten.sh [-m MARK_MASK] PORT[,PORT...] -- CMD [ARG...]
#
# Uplinks: every interface with a global IPv4 address (like nswrap's default), each with the
# gateway of its default route. Server subnet 198.18.255.252/30, tables/priorities from 5000.
# Only for the benchmark lab: it runs in a throwaway namespace, never on a real host.
set -euo pipefail

mask=0xf0000000
if [[ ${1:-} == -m ]]; then mask=$2; shift 2; fi
ports=$1; shift
[[ ${1:-} == -- ]] && shift

id=hw$$
host_if=nsw-$id
ns=nswrap-$id
host_addr=198.18.255.253/30 server_addr=198.18.255.254/30 subnet=198.18.255.252/30
shift_bits=0
while (( (mask >> shift_bits & 1) == 0 )); do shift_bits=$((shift_bits + 1)); done
keep=$(printf '0x%08x' $(( ~mask & 0xffffffff )))
mask=$(printf '0x%08x' "$mask")

mapfile -t uplinks < <(ip -4 -o addr show scope global | awk '{print $2}' | grep -v "^nsw-" | awk '!seen[$0]++')

undo=()
rollback() {
    local i
    for ((i = ${#undo[@]} - 1; i >= 0; i--)); do eval "${undo[i]}" 2>/dev/null || true; done
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

ip netns add "$ns"
undo+=("ip netns del $ns")
undo+=("ip link del $host_if")
ip link add "$host_if" mtu 1500 type veth peer name eth0 mtu 1500 netns "$ns"
ip addr add "$host_addr" dev "$host_if"
ip link set "$host_if" up
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$server_addr" dev eth0
ip -n "$ns" link set eth0 up
ip -n "$ns" route add default via "${host_addr%/*}" dev eth0

mark_rules="" reply_rules="" names=""
for k in "${!uplinks[@]}"; do
    dev=${uplinks[k]} table=$((5000 + k)) mark=$(printf '0x%08x' $(( (k + 1) << shift_bits )))
    gw=$(ip -4 route show default dev "$dev" | awk '/via/ {print $3; exit}')
    if [[ -n $gw ]]; then
        undo+=("ip route del default via $gw dev $dev table $table proto 110")
        ip route add default via "$gw" dev "$dev" table "$table" proto 110
    fi
    while read -r dst src; do
        undo+=("ip route del $dst dev $dev scope link src $src table $table proto 110")
        ip route add "$dst" dev "$dev" scope link src "$src" table "$table" proto 110
    done < <(ip -4 route show dev "$dev" scope link proto kernel | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $1, $(i + 1)}')
    undo+=("ip route del $subnet dev $host_if scope link table $table proto 110")
    ip route add "$subnet" dev "$host_if" scope link table "$table" proto 110
    undo+=("ip rule del fwmark $mark/$mask lookup $table priority $table protocol 110")
    ip rule add fwmark "$mark/$mask" lookup "$table" priority "$table" protocol 110
    mark_rules+="		iifname \"$dev\" meta nfproto ipv4 fib daddr type local meta l4proto . th dport @published meta mark set meta mark & $keep | $mark ct mark set ct mark & $keep | $mark"$'\n'
    reply_rules+="		iifname \"$host_if\" ct direction reply ct mark & $mask == $mark meta mark set meta mark & $keep | $mark"$'\n'
    names+="${names:+, }\"$dev\""
done
for dev in "${uplinks[@]}"; do
    sysctl_set "net.ipv4.conf.$dev.forwarding" 1
    sysctl_set "net.ipv4.conf.$dev.src_valid_mark" 1
done
sysctl_set "net.ipv4.conf.$host_if.forwarding" 1

elements=$(sed 's/\([0-9]\+\)/udp . \1/g' <<<"$ports" | sed 's/,/, /g')
undo+=("nft delete table inet $ns")
nft -f - <<EOF
table inet $ns {
	set published { type inet_proto . inet_service; flags interval; elements = { $elements } }
	chain remember_uplink {
		type filter hook prerouting priority mangle; policy accept;
${mark_rules}${reply_rules}	}
	chain publish {
		type nat hook prerouting priority dstnat; policy accept;
		iifname { $names } meta nfproto ipv4 fib daddr type local meta l4proto . th dport @published dnat ip to ${server_addr%/*}
	}
	chain guard {
		type filter hook forward priority filter; policy accept;
		meta mark & $mask != 0 meta mark set meta mark & $keep
		oifname "$host_if" ct status dnat accept
		oifname "$host_if" drop
		iifname "$host_if" ct status dnat accept
		iifname "$host_if" drop
	}
}
EOF

# The server; a SIGTERM to this script stops it, then the EXIT trap undoes everything.
ip netns exec "$ns" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' TERM INT
status=0
wait "$server" || status=$?
if kill -0 "$server" 2>/dev/null; then wait "$server" || status=$?; fi
exit "$status"
