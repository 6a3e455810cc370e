//! The harness itself: namespaces are wired as planned, traffic crosses the worker, the
//! safety routes hold, and nothing is left behind.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use vmedge_tests::{list_namespaces, Lab};

/// Serves one echo connection per accept until the listener is dropped with the thread.
fn echo_server(listener: TcpListener) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut conn, peer) = listener.accept().unwrap();
            peers.push(peer);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n]).unwrap();
            }
        }
        peers
    })
}

fn echo_round_trip(mut conn: TcpStream, payload: &[u8]) -> Vec<u8> {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = conn.try_clone().unwrap();
    let expected = payload.len();
    let read = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(expected);
        reader.read_to_end(&mut got).unwrap();
        got
    });
    conn.write_all(payload).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    read.join().unwrap()
}

#[test]
fn tcp_echo_across_two_vm_namespaces_over_ipv6_and_ipv4() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.vms[0], &lab.vms[1]);
    assert_ne!(a.ipv6, b.ipv6);

    let listener = b.ns.enter(|| TcpListener::bind("[::]:7007").unwrap());
    let server = echo_server(listener);

    // 1 MiB of non-repeating bytes, so a reordering or truncation cannot pass.
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for target in [IpAddr::V6(b.ipv6), IpAddr::V4(b.ipv4)] {
        let conn = a.ns.enter(|| {
            TcpStream::connect_timeout(&SocketAddr::new(target, 7007), Duration::from_secs(10))
                .unwrap()
        });
        assert_eq!(
            conn.local_addr().unwrap().ip().to_canonical(),
            match target {
                IpAddr::V6(_) => IpAddr::V6(a.ipv6),
                IpAddr::V4(_) => IpAddr::V4(a.ipv4),
            }
        );
        let echoed = echo_round_trip(conn, &payload);
        assert_eq!(echoed.len(), payload.len(), "to {target}");
        assert!(echoed == payload, "to {target}: the echo differs");
    }
    // The server saw VM a's own addresses: routed by the worker, not translated.
    let peers: Vec<IpAddr> = server
        .join()
        .unwrap()
        .iter()
        .map(|p| p.ip().to_canonical())
        .collect();
    assert_eq!(peers, [IpAddr::V6(a.ipv6), IpAddr::V4(a.ipv4)]);
}

#[test]
fn addresses_follow_the_plan_and_stay_in_the_test_prefixes() {
    let lab = Lab::new(3);
    let n = lab.id();
    for (i, vm) in lab.vms.iter().enumerate() {
        assert_eq!(
            vm.ipv6,
            format!("fd5e:ed00:{n:x}:{:x}::2", i + 1)
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(vm.ipv4.octets(), [198, 18, n as u8, 4 * i as u8 + 2]);
        assert_eq!(
            vm.gateway_ipv4.octets(),
            [198, 18, n as u8, 4 * i as u8 + 1]
        );
        assert_eq!(vm.ipv6.segments()[..2], [0xfd5e, 0xed00]);
        // The tap is in the worker namespace, up, with the gateway addresses.
        let out = lab
            .worker
            .ip(&["-br", "addr", "show", "dev", &vm.interface]);
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(
            line.contains("UP")
                && line.contains(&vm.gateway_ipv6.to_string())
                && line.contains(&vm.gateway_ipv4.to_string()),
            "{line}"
        );
    }
    // The worker reaches each VM, and its own (DNS gate) address answers inside the lab.
    for vm in &lab.vms {
        lab.worker
            .sh(&["ping", "-6", "-c1", "-W5", &vm.ipv6.to_string()]);
        vm.ns
            .sh(&["ping", "-4", "-c1", "-W5", &vm.gateway_ipv4.to_string()]);
        vm.ns
            .sh(&["ping", "-6", "-c1", "-W5", &lab.worker_ipv6.to_string()]);
    }
}

/// "No route": what an unreachable route (or a router's ICMP answer) gives a connect.
fn unreachable(err: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let code = err.raw_os_error();
    code == Some(Errno::EHOSTUNREACH as i32) || code == Some(Errno::ENETUNREACH as i32)
}

#[test]
fn the_root_namespace_cannot_reach_the_labs_and_unplanned_addresses_go_nowhere() {
    let lab = Lab::new(1);
    // The safety routes are installed...
    let routes = String::from_utf8_lossy(
        &vmedge_tests::run(
            std::process::Command::new("ip").args(["-6", "route", "show", "table", "main"]),
        )
        .stdout,
    )
    .into_owned();
    assert!(routes.contains("unreachable fd5e::/16"), "{routes}");
    let routes4 = String::from_utf8_lossy(
        &vmedge_tests::run(std::process::Command::new("ip").args(["route", "show"])).stdout,
    )
    .into_owned();
    assert!(routes4.contains("unreachable 198.18.0.0/15"), "{routes4}");
    // ...so from the root namespace a lab address is refused at once, not sent out.
    for addr in [IpAddr::V6(lab.vms[0].ipv6), IpAddr::V4(lab.vms[0].ipv4)] {
        let err = TcpStream::connect_timeout(&SocketAddr::new(addr, 7), Duration::from_secs(5))
            .unwrap_err();
        assert!(unreachable(&err), "{addr}: {err}");
    }
    // Inside a VM, an address of the test prefix that no VM has is unreachable too.
    let err = lab.vms[0].ns.enter(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V6(lab.unused_ipv6()), 7),
            Duration::from_secs(5),
        )
        .unwrap_err()
    });
    assert!(unreachable(&err), "{}: {err}", lab.unused_ipv6());
}

#[test]
fn namespaces_are_removed_on_drop_and_after_a_panic() {
    let names = {
        let lab = Lab::new(2);
        let names = lab.namespaces();
        let live = list_namespaces();
        assert!(
            names.iter().all(|n| live.contains(n)),
            "{names:?} not in {live:?}"
        );
        names
    };
    let live = list_namespaces();
    assert!(
        names.iter().all(|n| !live.contains(n)),
        "left behind: {live:?}"
    );

    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::new(1);
        tx.send(lab.namespaces()).unwrap();
        panic!("a test failing half-way");
    });
    assert!(result.is_err());
    let names = rx.recv().unwrap();
    let live = list_namespaces();
    assert!(
        names.iter().all(|n| !live.contains(n)),
        "left behind after a panic: {live:?}"
    );
}
