#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("sockops")
int bench_empty(struct bpf_sock_ops *skops)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
