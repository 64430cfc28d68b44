#!/usr/bin/python3
"""Opens one TCP connection on loopback (to a listener of its own, in the same process, so in
the same cgroup) and prints the keepalive settings both ends got, read with getsockopt:
"keepalive=1 idle=180 intvl=60 cnt=20" for the connecting end, the same with "accepted-" for
the other. With --out FILE, writes that line to FILE (for a unit at boot) instead."""
import socket
import sys


def settings(sock, prefix=""):
    get = sock.getsockopt
    return " ".join(
        f"{prefix}{name}={get(level, opt)}"
        for name, level, opt in [
            ("keepalive", socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            ("idle", socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            ("intvl", socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            ("cnt", socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        ]
    )


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    line = settings(client) + " " + settings(accepted, "accepted-")
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        with open(sys.argv[2] + ".tmp", "w") as out:
            out.write(line + "\n")
        import os

        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    else:
        print(line)


main()
