hold=/sys/fs/cgroup/kad-matrix-hold
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
  echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control || echo "hold: +$c refused"
done >> "$out/hold.log" 2>&1
mkdir -p "$hold/held" /tmp/kad-matrix-hold
printf '[[policy]]\ncgroup = "kad-matrix-hold/held"\nidle = 600\n' > /tmp/kad-matrix-hold/kad.toml
"$KAD_BIN" daemon --socket /tmp/kad-matrix-hold/kad.sock --state-dir /tmp/kad-matrix-hold/state \
  --bpffs /sys/fs/bpf/kad-matrix-hold --config /tmp/kad-matrix-hold/kad.toml >> "$out/hold.log" 2>&1 &
i=0
until "$KAD_BIN" status --socket /tmp/kad-matrix-hold/kad.sock > /dev/null 2>&1 || [ $i -ge 120 ]; do
  sleep 1; i=$((i+1))
done
"$KAD_BIN" status --socket /tmp/kad-matrix-hold/kad.sock >> "$out/hold.log" 2>&1 \
  || echo 'hold: no kad daemon: static keys of cgroup BPF programs are not held' >> "$out/hold.log"
