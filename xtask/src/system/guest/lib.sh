# The scenarios, run as root in the guest by /share/run.sh, which sources this file and calls
# `scenario NAME` for each. Each prints its verdict on a line of its own, "### ok NAME" or
# "### FAILED NAME: REASON"; what it noticed on the way is indented below it.
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Kept on the disk, for the second boot of an overlay.
STATE=/var/lib/kad-system-test
mkdir -p "$STATE"

fail() {
    printf '%s\n' "$*" > /tmp/reason
    exit 1
}
note() { printf '    %s\n' "$*"; }

# Runs scenario_NAME in a subshell that stops at its first failing command or `fail`.
scenario() {
    local name=$1 rc start=$SECONDS
    rm -f /tmp/reason /tmp/clients
    echo "### start $name"
    (
        set -eE -o pipefail
        trap 'rc=$?; fail "line $LINENO: \`$BASH_COMMAND\` exited with $rc"' ERR
        "scenario_$name"
    )
    rc=$?
    stop_clients
    if [ "$rc" = 0 ]; then
        echo "### ok $name ($((SECONDS - start)) s)"
    else
        echo "### FAILED $name: $(cat /tmp/reason 2>/dev/null || echo "exited with $rc") ($((SECONDS - start)) s)"
    fi
}

# Starts a client that holds its connection open: `hold curl --no-keepalive -sN telnet://127.0.0.1:80`. Its
# stdin stays open (a sleep), in a process group of its own that stop_clients kills.
hold() {
    setsid bash -c "sleep 3600 | $*" > /dev/null 2>&1 &
    echo $! >> /tmp/clients
}
stop_clients() {
    local pid
    [ -f /tmp/clients ] || return 0
    for pid in $(cat /tmp/clients); do
        kill -- "-$pid" 2> /dev/null || true
    done
    rm -f /tmp/clients
    sleep 0.5
}

# until SECONDS COMMAND...: runs COMMAND every half second until it succeeds (status 0), or
# fails after SECONDS.
until_ok() {
    local deadline=$((SECONDS + $1))
    shift
    while ! "$@" > /dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# The established connections whose local port is $1, from the kernel (ss), one line each:
# the remaining time of its keepalive timer ("2min59sec"), or "none".
server_timers() {
    ss -tnoH state established "( sport = :$1 )" |
        sed -e 's/.*timer:(keepalive,\([^,]*\),.*/\1/;t' -e 's/.*/none/'
}
client_timers() {
    ss -tnoH state established "( dport = :$1 )" |
        sed -e 's/.*timer:(keepalive,\([^,]*\),.*/\1/;t' -e 's/.*/none/'
}
connections() { ss -tnoH state established "( sport = :$1 )" | grep -c . || true; }
has_connections() { [ "$(connections "$1")" -ge "$2" ]; }
# ss's "2min59sec", "59sec", "873ms" in whole seconds.
to_seconds() {
    local t=$1 m=0 s=0
    case $t in *min*) m=${t%%min*} t=${t#*min} ;; esac
    case $t in *sec) s=${t%sec} s=${s%%.*} ;; esac
    echo $((m * 60 + s))
}

# expect_server PORT IDLE WHAT: the accepting end of each connection on PORT has a keepalive
# timer that the policy's idle time armed (IDLE seconds at most, and less than a minute ago).
expect_server() {
    local port=$1 idle=$2 what=$3 t secs timers
    timers=$(server_timers "$port")
    [ -n "$timers" ] || fail "$what: no established connection on port $port"
    for t in $timers; do
        [ "$t" != none ] ||
            fail "$what: a connection on port $port has no keepalive: $(ss -tnoH state established "( sport = :$port )" | tr -s ' \n' ' ;')"
        secs=$(to_seconds "$t")
        [ "$secs" -le "$idle" ] && [ "$secs" -gt $((idle - 60)) ] ||
            fail "$what: keepalive timer $t on port $port; the policy's idle time is $idle s"
    done
    note "$what: port $port keepalive timer(s) $(echo $timers)"
}

# The connecting ends (curl --no-keepalive) are in this script's cgroup, which has no
# policy: they stay without keepalive.
expect_clients_untouched() {
    local t
    for t in $(client_timers "$1"); do
        [ "$t" = none ] || fail "a client of port $1 outside any policy got keepalive ($t)"
    done
}

# expect_probe "OUTPUT" IDLE WHAT: probe.py's line shows keepalive with IDLE at both ends.
expect_probe() {
    case " $1 " in
    *" keepalive=1 idle=$2 "*" accepted-keepalive=1 accepted-idle=$2 "*) note "$3: $1" ;;
    *) fail "$3: expected keepalive with idle $2 at both ends, got: $1" ;;
    esac
}

main_pid() { systemctl show -p MainPID --value kad; }
kad_active() { [ "$(systemctl is-active kad)" = active ]; }

install_deb() {
    local dir=$1
    rm -rf /root/deb && mkdir /root/deb && cp "$dir"/kad_*.deb /root/deb/
    (cd /root/deb && apt-get install -y -q ./kad_*.deb) > /tmp/apt.log 2>&1 ||
        fail "apt-get install $(ls /root/deb): $(tail -n 5 /tmp/apt.log | tr '\n' ' ')"
}

# loop_start IDLE: a client in a unit of its own (kad-loop.service) under a policy with IDLE,
# connecting in a loop, each connection checked from inside (loop.py).
loop_start() {
    rm -f /run/kad-loop.out /run/kad-loop.stop
    systemctl reset-failed kad-loop.service 2> /dev/null || true
    kad set --unit kad-loop.service --idle "$1" --intvl 10 --cnt 3 > /dev/null
    systemd-run --quiet --unit kad-loop python3 /share/loop.py "$1" /run/kad-loop.out /run/kad-loop.stop
    until_ok 30 loop_has 5 || fail "the connecting loop did not start: $(systemctl status kad-loop 2>&1 | tail -n 3)"
}
loop_has() { [ -f /run/kad-loop.out ] && [ "$(cut -d' ' -f1 /run/kad-loop.out)" -ge "$1" ]; }
# loop_stop WHAT: stops the loop; every connection it made had the policy.
loop_stop() {
    local total bad first
    touch /run/kad-loop.stop
    until_ok 30 sh -c '! systemctl is-active --quiet kad-loop' || fail "the loop did not stop"
    read -r total bad first < /run/kad-loop.out
    [ "$bad" = 0 ] || fail "$1: $bad of $total connections' ends without the policy; first: $first"
    note "$1: $total connections, every end with the policy"
}

scenario_install() {
    install_deb /share/deb
    [ -x /usr/bin/kad ] || fail "the package has no /usr/bin/kad"
    [ "$(systemctl is-enabled kad)" = enabled ] || fail "kad.service is not enabled"
    note "installed $(dpkg-query -W -f '${Package} ${Version}' kad)"
}

scenario_service() {
    # Type=notify: systemctl start (the package's) returned once the daemon said READY=1; had
    # it not, the unit would still be activating, or failed on its start timeout.
    [ "$(systemctl show -p Type --value kad)" = notify ] || fail "kad.service is not Type=notify"
    kad_active || fail "kad.service is $(systemctl is-active kad): $(systemctl status kad 2>&1 | tail -n 5 | tr '\n' ' ')"
    [ "$(systemctl show -p NRestarts --value kad)" = 0 ] || fail "kad.service restarted at start"
    local user="setpriv --reuid=nobody --regid=nogroup --clear-groups --"
    $user kad status > /tmp/status 2>&1 || fail "kad status as nobody: $(cat /tmp/status)"
    grep -q . /tmp/status || fail "kad status as nobody printed nothing"
    $user kad status --json | python3 -c 'import json, sys; json.load(sys.stdin)' ||
        fail "kad status --json as nobody is not JSON"
    $user kad list > /dev/null || fail "kad list as nobody failed"
    if $user kad set --cgroup kad-nobody > /tmp/set 2>&1; then
        fail "nobody was allowed to set a policy"
    fi
    note "kad set as nobody: $(head -n 1 /tmp/set)"
    # kad exec: a transient cgroup with its policy, made by the CLI, removed by the daemon.
    expect_probe "$(kad exec --idle 100 --intvl 20 --cnt 4 -- python3 /share/probe.py)" 100 "kad exec"
    # A kad exec killed with its command leaves its cgroup: the daemon removes it.
    kad exec --idle 100 -- sh -c 'cat /proc/self/cgroup > /tmp/exec-cgroup; exec sleep 3600' &
    local exec_pid=$! cgroup
    disown
    until_ok 20 test -s /tmp/exec-cgroup || fail "kad exec did not run its command"
    cgroup=/sys/fs/cgroup$(cut -d: -f3 /tmp/exec-cgroup)
    kill -KILL "$exec_pid" $(cat "$cgroup/cgroup.procs")
    until_ok 60 test ! -d "$cgroup" || fail "the daemon did not remove $cgroup, left by a killed kad exec"
    note "a killed kad exec's cgroup removed by the daemon: $cgroup"
    # Every feature on, on 6.1 and later: neither the kernel nor the sandbox (a system call
    # refused with EPERM, say) took one away.
    kad status > /tmp/status
    sed 's/^/    status: /' /tmp/status
    [ "$(grep -c '^feature:.*: yes$' /tmp/status)" -ge 4 ] && ! grep '^feature:' /tmp/status | grep -qv ': yes$' ||
        fail "kad status: a feature is off: $(grep '^feature:' /tmp/status | tr -s ' \n' ' ;')"
    systemd-analyze security kad.service > /tmp/security 2>&1 || true
    note "security: $(grep -o 'Overall exposure level.*' /tmp/security)"
    sed 's/^/    | /' /tmp/security
}

scenario_services() {
    for unit in nginx redis-server; do
        [ "$(systemctl is-active $unit)" = active ] || fail "$unit is not running"
    done
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    hold redis-cli -h 127.0.0.1 -p 6379
    until_ok 20 has_connections 80 1 || fail "curl made no connection to nginx"
    until_ok 20 has_connections 6379 1 || fail "redis-cli made no connection to redis"
    [ "$(server_timers 80)" = none ] || fail "nginx's connection had keepalive before any policy"
    note "before: nginx $(server_timers 80), redis (its own tcp-keepalive) $(server_timers 6379)"
    kad set --unit nginx.service --idle 180 --intvl 60 --cnt 20 > /dev/null
    expect_server 80 180 "nginx, connection established before kad set"
    expect_clients_untouched 80
    # redis sets its own keepalive (tcp-keepalive 300) on each client: --enforce wins over it.
    kad set --unit redis-server.service --idle 120 --intvl 30 --cnt 5 --enforce > /dev/null
    expect_server 6379 120 "redis, connection established before kad set"
    stop_clients
    local before after
    before=$(stat -c %i /sys/fs/cgroup/system.slice/nginx.service)
    systemctl restart nginx
    after=$(stat -c %i /sys/fs/cgroup/system.slice/nginx.service)
    [ "$before" != "$after" ] || fail "nginx's cgroup is the same after its restart"
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    until_ok 20 has_connections 80 1 || fail "curl made no connection to the restarted nginx"
    expect_server 80 180 "nginx restarted (a new cgroup), its first connection"
    systemctl restart redis-server
    hold redis-cli -h 127.0.0.1 -p 6379
    until_ok 20 has_connections 6379 1 || fail "redis-cli made no connection to the restarted redis"
    expect_server 6379 120 "redis restarted, its first connection"
    # Another user's connection in another network namespace, established before its policy:
    # the daemon reaches it through /proc/PID/ns/net and setns(2), inside its sandbox.
    systemd-run --quiet --unit kad-netns -p PrivateNetwork=yes -p User=nobody \
        python3 -c 'import socket, time
l = socket.socket(); l.bind(("127.0.0.1", 7777)); l.listen()
c = socket.create_connection(("127.0.0.1", 7777)); a = l.accept(); time.sleep(3600)'
    local pid
    until_ok 20 sh -c '[ "$(systemctl show -p MainPID --value kad-netns)" != 0 ]' || fail "kad-netns did not start"
    pid=$(systemctl show -p MainPID --value kad-netns)
    until_ok 20 sh -c "nsenter -t $pid -n ss -tnoH state established '( sport = :7777 )' | grep -q ." ||
        fail "no connection in kad-netns's network namespace"
    kad set --unit kad-netns.service --idle 190 --intvl 10 --cnt 3 > /dev/null
    local t
    t=$(nsenter -t "$pid" -n ss -tnoH state established '( sport = :7777 )' |
        sed -e 's/.*timer:(keepalive,\([^,]*\),.*/\1/;t' -e 's/.*/none/')
    systemctl stop kad-netns
    [ "$t" != none ] && [ "$(to_seconds "$t")" -le 190 ] && [ "$(to_seconds "$t")" -gt 130 ] ||
        fail "nobody's connection in another network namespace: keepalive timer $t, the policy's idle is 190 s"
    note "nobody's connection in another network namespace: keepalive timer $t"
}

scenario_kill() {
    local pid restarts
    kad set --unit nginx.service --idle 180 --intvl 60 --cnt 20 > /dev/null
    loop_start 150
    pid=$(main_pid)
    restarts=$(systemctl show -p NRestarts --value kad)
    systemctl kill -s KILL kad
    # Made while the daemon is dead or restarting: the pinned programs still act.
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    until_ok 20 has_connections 80 1 || fail "curl made no connection to nginx"
    expect_server 80 180 "nginx, connection made as kad was killed"
    until_ok 60 sh -c "[ \"\$(systemctl is-active kad)\" = active ] && [ \"\$(systemctl show -p MainPID --value kad)\" != $pid ]" ||
        fail "kad was not restarted: $(systemctl status kad 2>&1 | tail -n 5 | tr '\n' ' ')"
    [ "$(systemctl show -p NRestarts --value kad)" -gt "$restarts" ] || fail "NRestarts did not grow"
    note "restarted by systemd: pid $pid -> $(main_pid)"
    stop_clients
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    until_ok 20 has_connections 80 1 || fail "curl made no connection to nginx"
    expect_server 80 180 "nginx, after kad's restart"
    kad list | grep -q nginx.service || fail "kad list lost nginx's policy: $(kad list)"
    until_ok 30 loop_has $(($(cut -d' ' -f1 /run/kad-loop.out) + 10)) || fail "the loop stalled"
    loop_stop "a client connecting in a loop throughout"
}

scenario_reload() {
    cat > /etc/kad/kad.toml << 'TOML'
[[policy]]
unit = "kad-config.service"
idle = 300
intvl = 30
cnt = 4
TOML
    systemctl reload kad
    until_ok 20 sh -c 'kad list | grep -q kad-config.service' ||
        fail "after systemctl reload, kad list has no kad-config.service: $(kad list)"
    expect_probe "$(systemd-run --quiet --wait --pipe --unit kad-config python3 /share/probe.py)" 300 \
        "a new unit under the config file's policy"
}

scenario_journal() {
    local warnings infos complaint
    cp /etc/kad/kad.toml /root/kad.toml.good
    echo 'this is [ not toml' > /etc/kad/kad.toml
    local refused=no
    systemctl reload kad 2> /tmp/reload || refused=yes
    until_ok 20 sh -c 'journalctl -u kad -t kad -p warning --no-pager | grep -q kad.toml' || true
    complaint=$(journalctl -u kad -t kad -p warning --no-pager -o cat | grep kad.toml | tail -n 1 || true)
    # The good file back before any verdict: the scenarios after this one need it.
    cp /root/kad.toml.good /etc/kad/kad.toml
    # ExecReload is `kad reload`, which answers: a bad file fails the reload.
    [ "$refused" = yes ] || fail "systemctl reload kad succeeded with a bad config file"
    note "systemctl reload kad with a bad config file: refused: $(tr '\n' ' ' < /tmp/reload)"
    [ -n "$complaint" ] ||
        fail "no message naming kad.toml at priority warning or higher; the last ones: $(journalctl -u kad -t kad -n 3 --no-pager -o cat | tr '\n' ' ')"
    note "$complaint"
    kad_active || fail "a bad config file stopped kad"
    kad list | grep -q kad-config.service || fail "a bad config file dropped the previous config"
    systemctl reload kad
    warnings=$(journalctl -u kad -t kad -p warning --no-pager -o cat | grep -c . || true)
    infos=$(journalctl -u kad -t kad -p info --no-pager -o cat | grep -c . || true)
    [ "$infos" -gt "$warnings" ] ||
        fail "every message of kad is at priority warning or higher ($warnings of $infos)"
    note "journal: $infos messages at info or higher, $warnings of them at warning or higher"
    journalctl -u kad -t kad --no-pager -o json | python3 -c '
import json, sys
seen = {}
for line in sys.stdin:
    p = json.loads(line).get("PRIORITY")
    seen[p] = seen.get(p, 0) + 1
print("    priorities (PRIORITY: count):", dict(sorted(seen.items())))'
}

# First boot of the reboot scenario: a policy for a unit that starts at boot after
# network.target and connects as it starts; the second boot checks what that connection got.
scenario_reboot_prepare() {
    cp /share/probe.py /usr/local/lib/kad-probe.py
    cat > /etc/systemd/system/kad-early.service << 'UNIT'
[Unit]
Description=kad test: connects as it starts, at boot, after network.target
After=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 /usr/local/lib/kad-probe.py --out /var/lib/kad-system-test/early

[Install]
WantedBy=multi-user.target
UNIT
    systemctl enable --quiet kad-early.service
    kad set --unit kad-early.service --idle 200 --intvl 20 --cnt 3 > /dev/null
    kad set --unit nginx.service --idle 180 --intvl 60 --cnt 20 > /dev/null
    rm -f "$STATE/early"
    cat /proc/sys/kernel/random/boot_id > "$STATE/boot_id"
}

scenario_reboot() {
    [ -f "$STATE/boot_id" ] || fail "the first boot did not prepare the reboot"
    [ "$(cat /proc/sys/kernel/random/boot_id)" != "$(cat "$STATE/boot_id")" ] || fail "no reboot happened"
    kad_active || fail "kad.service is not active after the reboot"
    [ -f "$STATE/early" ] || fail "kad-early.service did not run: $(systemctl status kad-early 2>&1 | tail -n 3)"
    expect_probe "$(cat "$STATE/early")" 200 "kad-early.service's connection at boot"
    note "kad ready at $(systemctl show -p ActiveEnterTimestampMonotonic --value kad) us, kad-early started at $(systemctl show -p ExecMainStartTimestampMonotonic --value kad-early) us"
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    until_ok 20 has_connections 80 1 || fail "curl made no connection to nginx"
    expect_server 80 180 "nginx after the reboot"
    [ -d /sys/fs/bpf/kad ] || fail "no /sys/fs/bpf/kad after the reboot"
}

scenario_upgrade() {
    local pid old new
    old=$(dpkg-query -W -f '${Version}' kad)
    pid=$(main_pid)
    loop_start 140
    install_deb /share/newer
    until_ok 30 kad_active || fail "kad is not active after the upgrade"
    new=$(dpkg-query -W -f '${Version}' kad)
    dpkg --compare-versions "$new" gt "$old" || fail "the package is still $new (was $old)"
    [ "$(main_pid)" != "$pid" ] || fail "the upgrade left the old daemon (pid $pid) running"
    note "upgraded $old -> $new, daemon pid $pid -> $(main_pid)"
    until_ok 30 loop_has $(($(cut -d' ' -f1 /run/kad-loop.out) + 10)) || fail "the loop stalled"
    loop_stop "a client connecting in a loop through the upgrade"
    kad list | grep -q nginx.service || fail "the upgrade lost nginx's policy: $(kad list)"
}

scenario_purge() {
    local before
    before=$(bpftool prog show | grep -c ' name kad_' || true)
    [ "$before" -gt 0 ] || fail "no kad program loaded before the purge: nothing to check"
    bpftool cgroup tree | grep -Eq 'sock_ops|setsockopt' || fail "no sock_ops attachment before the purge"
    apt-get purge -y -q kad > /tmp/apt.log 2>&1 || fail "apt-get purge kad: $(tail -n 5 /tmp/apt.log | tr '\n' ' ')"
    local left=()
    [ ! -e /sys/fs/bpf/kad ] || left+=("pins: $(find /sys/fs/bpf/kad | head -n 5 | tr '\n' ' ')")
    ! bpftool cgroup tree | grep -E 'sock_ops|setsockopt' > /tmp/attached || left+=("attachments: $(tr -s ' \n' ' ;' < /tmp/attached)")
    ! bpftool prog show | grep ' name kad_' > /tmp/progs || left+=("programs: $(tr -s ' \n' ' ;' < /tmp/progs)")
    [ ! -e /var/lib/kad ] || left+=("state: $(ls -A /var/lib/kad | tr '\n' ' ')")
    [ ! -e /etc/kad ] || left+=("config: $(ls -A /etc/kad | tr '\n' ' ')")
    [ ! -e /usr/bin/kad ] || left+=("/usr/bin/kad")
    [ ! -e /run/kad/kad.sock ] || left+=("/run/kad/kad.sock")
    ! systemctl list-unit-files kad.service | grep -q kad.service || left+=("unit: $(systemctl list-unit-files kad.service | grep kad.service)")
    ! ls /etc/systemd/system/*.wants/kad.service > /dev/null 2>&1 || left+=("unit enabled: $(ls /etc/systemd/system/*.wants/kad.service)")
    [ ${#left[@]} = 0 ] || grep -v 'Reading database' /tmp/apt.log | sed 's/^/    apt: /'
    [ ${#left[@]} = 0 ] || fail "apt-get purge left ${left[*]}; apt-get said: $(tail -n 4 /tmp/apt.log | tr '\n' ' ')"
    note "$before kad programs loaded before the purge, none after; no pin, attachment, state, config or unit"
    # Sockets keep the options they have: nginx's listener keeps what kad gave it (`kad
    # uninstall` detaches, it does not rewrite sockets) until nginx makes it again.
    systemctl restart nginx || fail "cannot restart nginx"
    hold curl --no-keepalive -sN telnet://127.0.0.1:80
    until_ok 20 has_connections 80 1 || fail "curl made no connection to nginx"
    [ "$(server_timers 80)" = none ] || fail "nginx's new connection still got keepalive after the purge"
}
