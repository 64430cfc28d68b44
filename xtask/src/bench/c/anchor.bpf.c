#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SOL_SOCKET 1
#define SO_KEEPALIVE 9
#define IPPROTO_TCP 6
#define TCP_KEEPIDLE 4
#define TCP_KEEPINTVL 5
#define TCP_KEEPCNT 6

SEC("sockops")
int bench_anchor(struct bpf_sock_ops *skops)
{
	int one = 1, idle = IDLE, intvl = INTVL, cnt = CNT;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_setsockopt(skops, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
