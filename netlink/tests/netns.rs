//! The requests against a real kernel, each test in network namespaces of its own (root, as CI
//! runs): links, addresses and routes read back; an interface moved and renamed into another
//! namespace; and a frame written into one tap coming out of the other through the two ingress
//! redirects, as the shim wires a pod's veth to the VM's tap.
use shoji_devices::virtio::net::tap::Tap;
use shoji_devices::virtio::net::NetBackend;
use shoji_netlink::{in_netns, IpNet, Netlink, Route};
use std::fs::File;
use std::time::{Duration, Instant};

/// A new network namespace, held by an fd (the thread that made it exits).
fn new_netns() -> File {
    std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; it exits right after opening its namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
        File::open("/proc/thread-self/ns/net").unwrap()
    })
    .join()
    .unwrap()
}

fn tap_in(ns: &File, name: &str) -> Tap {
    in_netns(ns, || Tap::open(name)).unwrap().unwrap()
}

#[test]
fn links_addresses_and_routes_read_back_and_a_link_moves_into_another_namespace() {
    let ns = new_netns();
    let tap = tap_in(&ns, "t0");
    let mut nl = Netlink::open_in(&ns).unwrap();
    let names: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["lo", "t0"], "a new namespace holds only what we made");
    let t0 = nl.link("t0").unwrap();
    assert!(!t0.up && !t0.loopback && t0.mac.is_some());
    nl.set_link(t0.index, Some(true), Some(1400), None, None).unwrap();
    let t0 = nl.link("t0").unwrap();
    assert_eq!((t0.up, t0.mtu), (true, 1400));

    let addr: IpNet = "10.9.0.2/24".parse().unwrap();
    nl.add_address(t0.index, addr).unwrap();
    assert_eq!(nl.addresses(t0.index).unwrap(), [addr]);
    let e = nl.add_address(t0.index, addr).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
    let default = Route::parse("default", "10.9.0.1").unwrap();
    let other = Route::parse("192.168.7.0/24", "").unwrap();
    nl.add_route(t0.index, &default).unwrap();
    nl.add_route(t0.index, &other).unwrap();
    // The kernel's own prefix route for 10.9.0.0/24 is not listed.
    let mut routes = nl.routes(t0.index).unwrap();
    routes.sort_by_key(|r| r.dest_text());
    assert_eq!(routes, [other, default]);

    // Moved and renamed, as the agent does with the guest's interface.
    let other_ns = new_netns();
    use std::os::fd::AsRawFd;
    nl.set_link(t0.index, Some(false), None, None, Some(other_ns.as_raw_fd())).unwrap();
    assert!(nl.link("t0").is_err(), "gone from the first namespace");
    let mut nl2 = Netlink::open_in(&other_ns).unwrap();
    let moved = nl2.link("t0").unwrap();
    nl2.set_link(moved.index, None, None, Some("eth0"), None).unwrap();
    let eth0 = nl2.link("eth0").unwrap();
    assert_eq!(eth0.mac, t0.mac, "the same interface");
    assert!(nl2.addresses(eth0.index).unwrap().is_empty(), "addresses do not travel");
    drop(tap);
    assert!(nl2.link("eth0").is_err(), "a tap goes when its fd closes");
}

/// Reads one frame from `tap` within a few seconds.
fn recv(tap: &mut Tap) -> Vec<u8> {
    let start = Instant::now();
    let mut buf = vec![0u8; 70_000];
    loop {
        if let Some(n) = tap.recv(&mut buf).unwrap() {
            return buf[..n].to_vec();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no frame arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn frames_cross_between_two_links_through_the_ingress_redirects_and_stop_when_removed() {
    let ns = new_netns();
    let (mut a, mut b) = (tap_in(&ns, "a"), tap_in(&ns, "b"));
    let mut nl = Netlink::open_in(&ns).unwrap();
    let (ia, ib) = (nl.link("a").unwrap().index, nl.link("b").unwrap().index);
    for i in [ia, ib] {
        nl.set_link(i, Some(true), None, None, None).unwrap();
        nl.add_ingress_qdisc(i).unwrap();
        assert_eq!(nl.ingress_filters(i).unwrap(), 0);
    }
    nl.add_redirect(ia, ib).unwrap();
    nl.add_redirect(ib, ia).unwrap();
    assert_eq!((nl.ingress_filters(ia).unwrap(), nl.ingress_filters(ib).unwrap()), (1, 1));

    // A 12-byte virtio-net header (no offload), then an Ethernet frame of an unused type.
    let frame = |payload: &[u8]| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f.resize(12 + 60, 0);
        f
    };
    // Drain whatever the kernel sent on its own (IPv6 router solicitations and the like).
    std::thread::sleep(Duration::from_millis(50));
    let mut scratch = vec![0u8; 70_000];
    while a.recv(&mut scratch).unwrap().is_some() || b.recv(&mut scratch).unwrap().is_some() {}

    a.send(&frame(b"a to b")).unwrap();
    let got = recv(&mut b);
    assert_eq!(&got[12 + 14..12 + 20], b"a to b");
    b.send(&frame(b"b to a")).unwrap();
    let got = recv(&mut a);
    assert_eq!(&got[12 + 14..12 + 20], b"b to a");

    for i in [ia, ib] {
        nl.delete_ingress_qdisc(i).unwrap();
        assert_eq!(nl.ingress_filters(i).unwrap(), 0, "the filters went with the qdisc");
    }
    a.send(&frame(b"dropped")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = vec![0u8; 70_000];
    while let Some(n) = b.recv(&mut buf).unwrap() {
        assert_ne!(&buf[12 + 14..12 + 21], b"dropped", "no redirect is left: {n}");
    }
}
