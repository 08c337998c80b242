// SPDX-License-Identifier: GPL-2.0
/* For tests/system/test_fastpath.py: the fast path's sections and maps, with an uplink program
 * the verifier refuses (it reads a packet without checking its length). No headers: built with
 * plain `clang -O2 -target bpf -c`. */
struct map_def {
	unsigned int type, key_size, value_size, max_entries, map_flags;
};
struct __sk_buff {
	unsigned int len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority,
		ingress_ifindex, ifindex, tc_index, cb[5], hash, tc_classid, data, data_end;
};

struct map_def published __attribute__((section("maps"), used)) = {1, 24, 28, 16, 0};
struct map_def flows __attribute__((section("maps"), used)) = {9, 40, 32, 16, 0};

__attribute__((section("tc/uplink"), used)) int uplink(struct __sk_buff *skb)
{
	return *(int *)(long)skb->data;
}

__attribute__((section("tc/veth"), used)) int veth(struct __sk_buff *skb)
{
	return -1;
}

char LICENSE[] __attribute__((section("license"), used)) = "GPL";
