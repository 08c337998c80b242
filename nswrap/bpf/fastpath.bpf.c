// SPDX-License-Identifier: GPL-2.0
/* nswrap's fast path (--datapath bpf; docs/fastpath.md): published flows between an uplink and a
 * server's namespace, without the host's IP stack, netfilter or conntrack.
 *
 *   uplink ingress (tc/uplink): a UDP or TCP packet to a published (uplink, address, protocol,
 *     port) is remembered in `flows` (the client's tuple -> the address and port asked, the
 *     uplink, its mark), its destination rewritten to the server's (and its source port, if that
 *     tuple is another live flow's: OTHER_PORTS), and handed to the server's namespace with
 *     bpf_redirect_peer.
 *   the host end of a server's veth, ingress (tc/veth): a packet of a remembered flow, from the
 *     veth that flow was published to, gets its source rewritten back to the address and port
 *     asked (and its destination port to the client's own) and leaves through the flow's uplink with bpf_redirect_neigh: the route is looked up
 *     with the uplink's mark (nswrap's table for that uplink, its gateway or on-link).
 *
 * Everything else (a client's fragments, IPv4 options, IPv6 extension headers, ICMP that is
 * about no fast-path flow, a flow the map does not hold) is TC_ACT_UNSPEC: the next tc filter of
 * another tool, if any, then the host's stack and nswrap's nftables datapath handle it as without
 * the fast path.
 *
 * The maps are created by nswrap's loader (nswrap/bpf/), not by libbpf: legacy definitions in a
 * section named "maps", whose layout the loader reads. Keys and values are written by
 * nswrap/bpf/fast.py; keep the structs below and that module in step.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct map_def {
	__u32 type, key_size, value_size, max_entries, map_flags;
};

/* published: (uplink, family, protocol, port asked, address asked) -> the server */
struct endpoint_key {
	__u32 ifindex;
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* IPPROTO_UDP or IPPROTO_TCP */
	__be16 port;
	__u8 addr[16]; /* IPv4: the first 4 bytes, the rest zero */
};

struct endpoint {
	__u32 veth; /* the host end of the server's veth */
	__u32 mark; /* the uplink's mark: its routing table */
	__u8 server[16];
	__be16 port; /* the server's port (a remapped one differs) */
	__u16 pad;
	__u32 timeout; /* seconds a quiet flow is kept to its uplink (--udp-timeout) */
};

/* flows: what the server's reply is matched by -> where it goes */
struct flow_key {
	__u8 client[16];
	__u8 server[16];
	__be16 client_port; /* as the server sees it: the client's own, or another (OTHER_PORTS) */
	__be16 server_port;
	__u8 family;
	__u8 proto;
	__u16 pad;
};

struct flow {
	__u8 asked[16];
	__be16 asked_port;
	__be16 client_port; /* the client's own: its key's differs when the flow was given another (OTHER_PORTS) */
	__u32 uplink;
	__u32 mark;
	__u32 veth;
	__u32 seen; /* when its client last sent (seconds of CLOCK_MONOTONIC): not part of its identity */
};

/* sources: which client addresses an uplink may bring (longest prefix wins: 1 allowed, 0 not);
 * nswrap writes what its routing table for the uplink reaches, less the host's own addresses,
 * its internal ranges and martians. The kernel's rp_filter never sees the fast path's packets. */
struct source_key {
	__u32 prefixlen; /* 32 (the uplink) + the address's bits */
	__u32 ifindex;
	__u8 addr[16]; /* IPv4 as ::ffff:a.b.c.d */
};

/* fragments of a server's reply: a first fragment (it has the ports) finds the flow, and leaves
 * it here for the later ones (which have none), by the fragments' identification */
struct frag_key {
	__u8 src[16];
	__u8 dst[16];
	__u32 id;
	__u8 family;
	__u8 proto;
	__u16 pad;
};

struct map_def published SEC("maps") = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(struct endpoint_key),
	.value_size = sizeof(struct endpoint),
	.max_entries = 262144,
	.map_flags = BPF_F_NO_PREALLOC,
};

struct map_def sources SEC("maps") = {
	.type = BPF_MAP_TYPE_LPM_TRIE,
	.key_size = sizeof(struct source_key),
	.value_size = 1,
	.max_entries = 16384,
	.map_flags = BPF_F_NO_PREALLOC,
};

struct map_def flows SEC("maps") = {
	.type = BPF_MAP_TYPE_LRU_HASH,
	.key_size = sizeof(struct flow_key),
	.value_size = sizeof(struct flow),
	.max_entries = 65536,
};

struct map_def frags SEC("maps") = {
	.type = BPF_MAP_TYPE_LRU_HASH,
	.key_size = sizeof(struct frag_key),
	.value_size = sizeof(struct flow),
	.max_entries = 4096,
};

/* meta: what nswrap's loader writes once (nswrap/bpf/fast.py, load). [0]: a random number the
 * other ports a flow may get are drawn with (OTHER_PORTS): nobody outside can compute them.
 * [1]: GENERATION, below; the programs never read it, a later nswrap does. */
struct map_def meta SEC("maps") = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u32),
	.max_entries = 2,
};

/* This object's generation: raised by one with every change to the code below or to how it is
 * compiled (tests/unit/test_bpf_generation.py holds it to a digest of both). nswrap replaces
 * loaded programs of an older generation with its own and never those of a newer one
 * (docs/fastpath.md, *Upgrades*). `published`, `sources` and `meta` are permanent, their structs
 * included: an older nswrap reads and writes them through a newer one's programs. */
__u32 GENERATION SEC("generation") = 1;

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP_MF_OFFSET 0x3fff
#define IP_OFFSET 0x1fff

/* A UDP or TCP packet, parsed: where its headers are, its addresses and ports; a fragment's
 * identification, and whether it is the first (with the ports) or a later one (without). */
enum { WHOLE, FIRST, LATER };

struct packet {
	__u8 family, proto, frag;
	__u8 midflow; /* a TCP segment without SYN: of a connection under way */
	__u32 l4; /* offset of the UDP/TCP header (in a FIRST fragment too) */
	__u32 id;
	__u8 src[16], dst[16];
	__be16 sport, dport;
};

/* An IPv6 fragment header (RFC 8200 4.5): what follows the fixed header when nexthdr is 44. */
struct frag6 {
	__u8 nexthdr, reserved;
	__be16 frag_off; /* offset << 3 | M */
	__be32 id;
};
#define IPPROTO_FRAGMENT6 44

static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5)
			return 0;
		if (ip->frag_off & bpf_htons(IP_MF_OFFSET)) {
			p->frag = ip->frag_off & bpf_htons(IP_OFFSET) ? LATER : FIRST;
			p->id = ip->id;
		}
		p->family = 4;
		p->proto = ip->protocol;
		__builtin_memcpy(p->src, &ip->saddr, 4);
		__builtin_memcpy(p->dst, &ip->daddr, 4);
		p->l4 = ETH_HLEN + sizeof(struct iphdr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return 0;
		p->family = 6;
		p->proto = ip6->nexthdr; /* another extension header is neither UDP nor TCP */
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		p->l4 = ETH_HLEN + sizeof(struct ipv6hdr);
		if (p->proto == IPPROTO_FRAGMENT6) {
			struct frag6 *fh = (void *)(ip6 + 1);

			if ((void *)(fh + 1) > end)
				return 0;
			p->proto = fh->nexthdr;
			p->frag = fh->frag_off & bpf_htons(0xfff8) ? LATER : FIRST;
			p->id = fh->id;
			p->l4 += sizeof(struct frag6);
		}
	} else {
		return 0;
	}
	if (p->proto != IPPROTO_UDP && p->proto != IPPROTO_TCP)
		return 0;
	if (p->frag == LATER)
		return 1;
	/* both headers start with the ports */
	__be16 *ports = data + p->l4;

	if ((void *)(ports + 2) > end)
		return 0;
	p->sport = ports[0];
	p->dport = ports[1];
	if (p->proto == IPPROTO_TCP) {
		__u8 *flags = data + p->l4 + 13;

		if ((void *)(flags + 1) > end)
			return 0;
		p->midflow = !(*flags & 0x02);
	}
	return 1;
}

static __always_inline __u32 l4_csum_off(const struct packet *p)
{
	return p->l4 + (p->proto == IPPROTO_UDP ? offsetof(struct udphdr, check) : offsetof(struct tcphdr, check));
}

/* Rewrite one port (source or destination), the checksum kept right. UDP over IPv4 may carry no
 * checksum (zero): BPF_F_MARK_MANGLED_0 leaves it so. */
static __always_inline int rewrite_port(struct __sk_buff *skb, const struct packet *p, int source, __be16 port)
{
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 old_port = source ? p->sport : p->dport;

	if (port == old_port)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(p), old_port, port, mangled | 2) ||
	    bpf_skb_store_bytes(skb, p->l4 + (source ? 0 : 2), &port, 2, 0))
		return -1;
	return 0;
}

/* Rewrite one address (destination or source) and its port, checksums kept right. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct packet *p, int source, const __u8 *addr,
				   __be16 port)
{
	__u32 csum = l4_csum_off(p);
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (p->family == 4) {
		__be32 old, new;

		__builtin_memcpy(&old, source ? p->src : p->dst, 4);
		__builtin_memcpy(&new, addr, 4);
		if (bpf_l4_csum_replace(skb, csum, old, new, BPF_F_PSEUDO_HDR | mangled | 4) ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 4) ||
		    bpf_skb_store_bytes(skb, source ? IP_SRC_OFF : IP_DST_OFF, &new, 4, 0))
			return -1;
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)(source ? p->src : p->dst), 16, (__be32 *)addr, 16, 0);

		if (diff < 0 || bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR | mangled) ||
		    bpf_skb_store_bytes(skb, source ? IP6_SRC_OFF : IP6_DST_OFF, addr, 16, 0))
			return -1;
	}
	return rewrite_port(skb, p, source, port);
}

static __always_inline int same(const struct flow *a, const struct flow *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

#pragma unroll
	for (int i = 0; i < offsetof(struct flow, seen) / 4; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}

/* A client that asks two addresses of the host from one port (an NTP client sends from 123
 * whatever it asks) makes two flows the server cannot tell apart, nor its answers: they would all
 * leave from the address asked first. So a flow whose client tuple a live flow already holds gets
 * another client port toward the server, one of OTHER_PORTS candidates drawn from what the flow
 * is (its client, its port, the address and port asked, the uplink) and the secret in `meta`: its next
 * packets draw the same ones and find it, and its answers get the client's port back. Conntrack does the same on
 * the nft datapath (its clash resolution gives such a flow another source port). */
#define OTHER_PORTS 4
enum { NO_PORT, MINE, FREE };

static __always_inline __be16 other_port(const struct flow_key *fk, const struct flow *f, __u32 seed, __u32 i)
{
	__u32 c[4], a[4], h = (seed + 0x9e3779b9 * (i + 1)) ^ f->uplink;

	__builtin_memcpy(c, fk->client, 16);
	__builtin_memcpy(a, f->asked, 16);
#pragma unroll
	for (int j = 0; j < 4; j++) {
		h = (h ^ c[j]) * 0x85ebca6b;
		h = (h ^ a[j]) * 0xc2b2ae35;
		h ^= h >> 15;
	}
	h = (h ^ ((__u32)f->client_port << 16 | f->asked_port)) * 0x85ebca6b;
	h ^= h >> 13;
	/* of the client port's own class, as conntrack keeps it (nf_nat_l4proto_unique_tuple): a
	 * server may trust a port below 1024 (NFS's `secure`) */
	__u16 own = bpf_ntohs(f->client_port);

	if (own < 512)
		return bpf_htons(1 + h % 511);
	if (own < 1024)
		return bpf_htons(600 + h % 424);
	return bpf_htons(1024 + h % (65536 - 1024));
}

/* Point `fk` at the flow `f` was given another port for (MINE), else at the first candidate no
 * live flow holds (FREE: quiet for `timeout` seconds, or none), else NO_PORT (`fk` as it was). */
static __always_inline int other_flow(struct flow_key *fk, const struct flow *f, __u32 now, __u32 timeout)
{
	struct flow_key k = *fk;
	__be16 free = 0;
	__u32 zero = 0, *seed = bpf_map_lookup_elem(&meta, &zero);

	if (!seed)
		return NO_PORT;
#pragma unroll
	for (__u32 i = 0; i < OTHER_PORTS; i++) {
		k.client_port = other_port(fk, f, *seed, i);
		if (k.client_port == f->client_port)
			continue;
		struct flow *o = bpf_map_lookup_elem(&flows, &k);

		if (o && same(o, f)) {
			fk->client_port = k.client_port;
			return MINE;
		}
		if (!free && (!o || now - o->seen >= timeout))
			free = k.client_port;
	}
	if (!free)
		return NO_PORT;
	fk->client_port = free;
	return FREE;
}

/* May this uplink bring a packet from `src`? (As strict reverse-path filtering would say with
 * nswrap's table for the uplink; a packet it may not bring is left to the host's stack.) */
static __always_inline int source_allowed(struct __sk_buff *skb, __u8 family, const __u8 *src)
{
	struct source_key k = {.prefixlen = 32 + 128, .ifindex = skb->ifindex};

	if (family == 4) {
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		__builtin_memcpy(&k.addr[12], src, 4);
	} else {
		__builtin_memcpy(k.addr, src, 16);
	}
	__u8 *allowed = bpf_map_lookup_elem(&sources, &k);

	return allowed && *allowed;
}

/* The endpoint a packet asks for on this uplink, if it is published. */
static __always_inline struct endpoint *endpoint_of(struct __sk_buff *skb, __u8 family, __u8 proto, __be16 port,
						    const __u8 *addr)
{
	struct endpoint_key key = {.ifindex = skb->ifindex, .family = family, .proto = proto, .port = port};

	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&published, &key);
}

static __always_inline void make_flow_key(struct flow_key *fk, __u8 family, __u8 proto, const __u8 *client,
					  __be16 client_port, const __u8 *server, __be16 server_port)
{
	__builtin_memcpy(fk->client, client, 16);
	__builtin_memcpy(fk->server, server, 16);
	fk->client_port = client_port;
	fk->server_port = server_port;
	fk->family = family;
	fk->proto = proto;
}

/* An ICMP error about a UDP or TCP flow (unreachable, time exceeded, too big, parameter problem):
 * the packet it quotes is the flow's, seen from the sender's side. */
struct quote {
	__u8 family, proto;
	__u32 icmp;  /* offset of the ICMP header: its checksum is 2 further */
	__u32 inner; /* offset of the quoted IP header */
	__u32 ports; /* offset of the quoted UDP/TCP ports */
	__u8 src[16], dst[16]; /* the outer packet's */
	__u8 qsrc[16], qdst[16]; /* the quoted packet's */
	__be16 qsport, qdport;
};

static __always_inline int same_address(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int error_type(__u8 family, __u8 type)
{
	if (family == 4) /* destination unreachable, time exceeded, parameter problem */
		return type == 3 || type == 11 || type == 12;
	return type >= 1 && type <= 4; /* unreachable, too big, time exceeded, parameter problem */
}

static __always_inline int parse_quote(struct __sk_buff *skb, struct quote *q)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 *type;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct iphdr *in = (void *)ip + sizeof(*ip) + 8;

		if ((void *)(in + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_ICMP ||
		    (ip->frag_off & bpf_htons(IP_MF_OFFSET)) || in->ihl != 5 ||
		    (in->protocol != IPPROTO_UDP && in->protocol != IPPROTO_TCP))
			return 0;
		type = (void *)(ip + 1);
		q->family = 4;
		q->proto = in->protocol;
		q->icmp = ETH_HLEN + sizeof(*ip);
		__builtin_memcpy(q->src, &ip->saddr, 4);
		__builtin_memcpy(q->dst, &ip->daddr, 4);
		__builtin_memcpy(q->qsrc, &in->saddr, 4);
		__builtin_memcpy(q->qdst, &in->daddr, 4);
		q->inner = q->icmp + 8;
		q->ports = q->inner + sizeof(*in);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct ipv6hdr *in = (void *)ip6 + sizeof(*ip6) + 8;

		if ((void *)(in + 1) > end || ip6->nexthdr != IPPROTO_ICMPV6 ||
		    (in->nexthdr != IPPROTO_UDP && in->nexthdr != IPPROTO_TCP))
			return 0;
		type = (void *)(ip6 + 1);
		q->family = 6;
		q->proto = in->nexthdr;
		q->icmp = ETH_HLEN + sizeof(*ip6);
		__builtin_memcpy(q->src, &ip6->saddr, 16);
		__builtin_memcpy(q->dst, &ip6->daddr, 16);
		__builtin_memcpy(q->qsrc, &in->saddr, 16);
		__builtin_memcpy(q->qdst, &in->daddr, 16);
		q->inner = q->icmp + 8;
		q->ports = q->inner + sizeof(*in);
	} else {
		return 0;
	}
	if (!error_type(q->family, *type))
		return 0;
	__be16 *ports = data + q->ports;

	if ((void *)(ports + 2) > end)
		return 0;
	q->qsport = ports[0];
	q->qdport = ports[1];
	return 1;
}

/* One address of an ICMP error rewritten: the outer one (`outer`) or the quoted one, checksums kept
 * right. IPv4: the IP header's own checksum (outer or quoted) absorbs the change, so the ICMP
 * checksum, which covers the quoted header, stays as it is. ICMPv6: its checksum covers the
 * pseudo-header (outer addresses) and the quote, so it takes the difference either way. */
static __always_inline int quote_addr(struct __sk_buff *skb, const struct quote *q, int outer, __u32 off,
				      const __u8 *old, const __u8 *new)
{
	if (q->family == 4) {
		__be32 o, n;

		__builtin_memcpy(&o, old, 4);
		__builtin_memcpy(&n, new, 4);
		if (bpf_l3_csum_replace(skb, outer ? IP_CSUM_OFF : q->inner + offsetof(struct iphdr, check), o, n, 4))
			return -1;
		return bpf_skb_store_bytes(skb, off, &n, 4, 0) ? -1 : 0;
	}
	__s64 diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new, 16, 0);

	if (diff < 0 || bpf_l4_csum_replace(skb, q->icmp + 2, 0, diff, outer ? BPF_F_PSEUDO_HDR : 0))
		return -1;
	return bpf_skb_store_bytes(skb, off, new, 16, 0) ? -1 : 0;
}

static __always_inline int quote_port(struct __sk_buff *skb, const struct quote *q, __u32 off, __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, q->icmp + 2, old, new, 2))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 2, 0) ? -1 : 0;
}

static __always_inline __u32 addr_off(const struct quote *q, int outer, int source)
{
	if (q->family == 4)
		return (outer ? ETH_HLEN : q->inner) + (source ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	return (outer ? ETH_HLEN : q->inner) + (source ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
}

/* From a client's side, about a packet the server sent (quoted: from the address and port asked,
 * to the client): to the server, as if the client had answered it directly. A too-big error
 * (PMTU) this way keeps TCP flows of a path with a smaller MTU from stalling. */
static __always_inline int error_in(struct __sk_buff *skb)
{
	struct quote q = {};
	struct flow_key fk = {};

	if (!parse_quote(skb, &q))
		return TC_ACT_UNSPEC;
	struct endpoint *ep = endpoint_of(skb, q.family, q.proto, q.qsport, q.qsrc);

	if (!ep || !source_allowed(skb, q.family, q.src))
		return TC_ACT_UNSPEC;
	make_flow_key(&fk, q.family, q.proto, q.qdst, q.qdport, ep->server, ep->port);
	struct flow *f = bpf_map_lookup_elem(&flows, &fk);
	struct flow mine = {.asked_port = q.qsport, .client_port = q.qdport, .uplink = skb->ifindex,
			    .mark = ep->mark, .veth = ep->veth};

	__builtin_memcpy(mine.asked, q.qsrc, 16);
	if (!f || !same(f, &mine)) /* the client's tuple is another flow's, or none: this one may have another port */
		f = other_flow(&fk, &mine, 0, 0) == MINE ? bpf_map_lookup_elem(&flows, &fk) : NULL;
	if (!f || f->uplink != skb->ifindex) /* no such flow here: the host's own, or a forgery */
		return TC_ACT_UNSPEC;
	__u32 veth = ep->veth;
	__u8 server[16];
	__be16 port = ep->port;

	__builtin_memcpy(server, ep->server, 16);
	if (quote_addr(skb, &q, 1, addr_off(&q, 1, 0), q.dst, server) ||
	    quote_addr(skb, &q, 0, addr_off(&q, 0, 1), q.qsrc, server) ||
	    quote_port(skb, &q, q.ports, q.qsport, port) || quote_port(skb, &q, q.ports + 2, q.qdport, fk.client_port))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(veth, 0);
}

/* From the server's namespace, about a packet a client sent it (quoted: from the client, to the
 * server): to the client from the address and port it asked (a closed port's unreachable). */
static __always_inline int error_out(struct __sk_buff *skb)
{
	struct quote q = {};
	struct flow_key fk = {};

	if (!parse_quote(skb, &q))
		return TC_ACT_UNSPEC;
	make_flow_key(&fk, q.family, q.proto, q.qsrc, q.qsport, q.qdst, q.qdport);
	struct flow *f = bpf_map_lookup_elem(&flows, &fk);

	/* from that flow's veth, and from the server itself (its own stack's error) */
	if (!f || f->veth != skb->ifindex || !same_address(q.src, q.qdst))
		return TC_ACT_UNSPEC;
	__u32 uplink = f->uplink;
	__u32 mark = f->mark;
	__u8 asked[16];
	__be16 asked_port = f->asked_port, client_port = f->client_port;

	__builtin_memcpy(asked, f->asked, 16);
	if (quote_addr(skb, &q, 1, addr_off(&q, 1, 1), q.src, asked) ||
	    quote_addr(skb, &q, 0, addr_off(&q, 0, 0), q.qdst, asked) ||
	    quote_port(skb, &q, q.ports + 2, q.qdport, asked_port) || quote_port(skb, &q, q.ports, q.qsport, client_port))
		return TC_ACT_SHOT;
	skb->mark = mark;
	return bpf_redirect_neigh(uplink, NULL, 0, 0);
}

SEC("tc/uplink")
int uplink(struct __sk_buff *skb)
{
	struct packet p = {};
	struct flow_key fk = {};
	struct flow f = {};

	if (!parse(skb, &p))
		return error_in(skb);
	if (p.frag) /* a client's fragments: conntrack reassembles them */
		return TC_ACT_UNSPEC;
	struct endpoint *ep = endpoint_of(skb, p.family, p.proto, p.dport, p.dst);

	if (!ep || !source_allowed(skb, p.family, p.src))
		return TC_ACT_UNSPEC;
	make_flow_key(&fk, p.family, p.proto, p.src, p.sport, ep->server, ep->port);
	__builtin_memcpy(f.asked, p.dst, 16);
	f.asked_port = p.dport;
	f.client_port = p.sport;
	f.uplink = skb->ifindex;
	f.mark = ep->mark;
	f.veth = ep->veth;
	__u32 now = bpf_ktime_get_ns() / 1000000000;

	f.seen = now;
	/* a lookup refreshes the entry's place in the LRU; write only what changed */
	struct flow *known = bpf_map_lookup_elem(&flows, &fk);

	if (!known && p.midflow) {
		/* a connection's segment whose tuple no flow holds (the entry evicted, or the flow that
		 * held the tuple when this one began is gone): it may have been given another port */
		if (other_flow(&fk, &f, now, ep->timeout) == MINE)
			known = bpf_map_lookup_elem(&flows, &fk);
		else
			fk.client_port = p.sport;
	} else if (known && !same(known, &f)) {
		/* the client's tuple is another flow's (through another uplink, or asking another
		 * address): a live one is not taken over (a LAN peer posing as the client would take its
		 * answers), this flow gets another port toward the server (OTHER_PORTS) */
		int other = other_flow(&fk, &f, now, ep->timeout);

		if (other == MINE) {
			known = bpf_map_lookup_elem(&flows, &fk);
		} else if (now - known->seen >= ep->timeout) {
			fk.client_port = p.sport; /* a quiet flow's tuple is taken */
			known = NULL;
		} else if (other == FREE && !p.midflow) {
			known = NULL;
		} else {
			/* every candidate is busy, or a connection under way lost its entry (it would land
			 * on another port): the host's stack judges it */
			return TC_ACT_UNSPEC;
		}
	}
	if (!known)
		bpf_map_update_elem(&flows, &fk, &f, BPF_ANY);
	else if (known->seen != now)
		known->seen = now;
	if (rewrite(skb, &p, 0, ep->server, ep->port) || rewrite_port(skb, &p, 1, fk.client_port))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(f.veth, 0);
}

/* The source of a later fragment (no ports in it): the address alone, and IPv4's header checksum. */
static __always_inline int rewrite_source_address(struct __sk_buff *skb, const struct packet *p, const __u8 *addr)
{
	if (p->family == 4) {
		__be32 old, new;

		__builtin_memcpy(&old, p->src, 4);
		__builtin_memcpy(&new, addr, 4);
		return bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 4) ||
		       bpf_skb_store_bytes(skb, IP_SRC_OFF, &new, 4, 0) ? -1 : 0;
	}
	return bpf_skb_store_bytes(skb, IP6_SRC_OFF, addr, 16, 0) ? -1 : 0;
}

SEC("tc/veth")
int veth(struct __sk_buff *skb)
{
	struct packet p = {};
	struct flow_key fk = {};
	struct frag_key rk = {};
	struct flow *f;

	if (!parse(skb, &p))
		return error_out(skb);
	if (p.frag) {
		__builtin_memcpy(rk.src, p.src, 16);
		__builtin_memcpy(rk.dst, p.dst, 16);
		rk.id = p.id;
		rk.family = p.family;
		rk.proto = p.proto;
	}
	if (p.frag == LATER) {
		f = bpf_map_lookup_elem(&frags, &rk);
		if (!f || f->veth != skb->ifindex)
			return TC_ACT_UNSPEC;
	} else {
		make_flow_key(&fk, p.family, p.proto, p.dst, p.dport, p.src, p.sport);
		f = bpf_map_lookup_elem(&flows, &fk);
		/* a flow published to another veth: a forged source, which nftables drops and counts */
		if (!f || f->veth != skb->ifindex)
			return TC_ACT_UNSPEC;
		if (p.frag == FIRST)
			bpf_map_update_elem(&frags, &rk, f, BPF_ANY);
	}
	__u32 uplink = f->uplink;
	__u32 mark = f->mark;
	__u8 asked[16];
	__be16 asked_port = f->asked_port;

	__builtin_memcpy(asked, f->asked, 16);
	__be16 client_port = f->client_port;

	if (p.frag == LATER ? rewrite_source_address(skb, &p, asked)
			    : rewrite(skb, &p, 1, asked, asked_port) || rewrite_port(skb, &p, 0, client_port))
		return TC_ACT_SHOT;
	skb->mark = mark;
	return bpf_redirect_neigh(uplink, NULL, 0, 0);
}

char LICENSE[] SEC("license") = "GPL";
