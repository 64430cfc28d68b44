// A TCP peer written the way most Go programs are: the default net.Dial and net.Listen, which
// turn keepalive on with Go's own 15 s idle and interval (since Go 1.13) after the connection
// is established. kad's tests build it statically (CGO_ENABLED=0) with Debian's golang-go.
//
//	gopeer listen ADDR    prints "LISTENING <port>", accepts one connection, reports
//	gopeer connect ADDR   connects, reports
//
// The report is the socket's options read with getsockopt, as JSON. The connection is then
// held until stdin closes; if it fails first, "CLOSED <unix ms> <error>" is printed.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

func report(c net.Conn) string {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return fmt.Sprintf(`{"error":%q}`, err.Error())
	}
	var ka, idle, intvl, cnt, uto int
	var gerr error
	raw.Control(func(fd uintptr) {
		get := func(level, name int) int {
			v, e := syscall.GetsockoptInt(int(fd), level, name)
			if e != nil && gerr == nil {
				gerr = e
			}
			return v
		}
		ka = get(syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
		idle = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
		intvl = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL)
		cnt = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT)
		uto = get(syscall.IPPROTO_TCP, 18)
	})
	if gerr != nil {
		return fmt.Sprintf(`{"error":%q}`, gerr.Error())
	}
	l := c.LocalAddr().(*net.TCPAddr)
	r := c.RemoteAddr().(*net.TCPAddr)
	return fmt.Sprintf(`{"keepalive":%t,"idle":%d,"intvl":%d,"cnt":%d,"user_timeout":%d,"local_port":%d,"peer_port":%d}`,
		ka != 0, idle, intvl, cnt, uto, l.Port, r.Port)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gopeer listen|connect ADDR")
		os.Exit(2)
	}
	var conn net.Conn
	switch os.Args[1] {
	case "listen":
		ln, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("LISTENING %d\n", ln.Addr().(*net.TCPAddr).Port)
		conn, err = ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "connect":
		var err error
		conn, err = net.Dial("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
	fmt.Println(report(conn))
	// Hold the connection until stdin closes; say when and how a read on it ended.
	go func() {
		buf := make([]byte, 1)
		_, err := conn.Read(buf)
		fmt.Printf("CLOSED %d %v\n", time.Now().UnixMilli(), err)
		os.Exit(0)
	}()
	bufio.NewReader(os.Stdin).ReadString(0)
}
