#!/usr/bin/python3
"""loop.py IDLE OUT STOP: connects on loopback in a loop (to a listener of its own, so both
ends are in this process's cgroup) until the file STOP exists, and checks each connection's
two ends: keepalive on, TCP_KEEPIDLE = IDLE. Keeps "TOTAL BAD FIRST-BAD" in OUT."""
import os
import socket
import sys
import time

idle, out, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
total, bad, first_bad = 0, 0, "-"


def state(sock):
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    )


while not os.path.exists(stop):
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    total += 1
    for end, sock in (("connecting", client), ("accepted", accepted)):
        keepalive, got_idle = state(sock)
        if keepalive != 1 or got_idle != idle:
            bad += 1
            if first_bad == "-":
                first_bad = f"connection-{total}-{end}-end:keepalive={keepalive},idle={got_idle}@{time.time():.1f}"
    client.close()
    accepted.close()
    with open(out + ".tmp", "w") as f:
        f.write(f"{total} {bad} {first_bad}\n")
    os.rename(out + ".tmp", out)
    time.sleep(0.05)
