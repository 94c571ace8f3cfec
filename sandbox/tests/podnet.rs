//! The pod network's host half on a real kernel (root, as CI runs): a namespace set up as CNI's
//! bridge plugin leaves it (a veth with an address and a default route) is wired to a tap, read
//! back for the guest, and unwired. The test builds the namespace with `ip`; the code under test
//! uses netlink only.
use shoji_netlink::{IpNet, Netlink, Route};
use shoji_sandbox::{PodNetwork, TAP_NAME};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A process in a network namespace of its own, and its namespace's path.
struct Netns(Child, PathBuf);

impl Netns {
    fn new() -> Netns {
        let child = Command::new("unshare").args(["--net", "sleep", "120"]).spawn().unwrap();
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&path).ok() == std::fs::read_link("/proc/self/ns/net").ok() {
            assert!(Instant::now() < deadline, "unshare did not run");
            std::thread::sleep(Duration::from_millis(5));
        }
        Netns(child, path)
    }

    fn ip(&self, args: &str) {
        let ns = format!("--net={}", self.1.display());
        let out = Command::new("nsenter").arg(ns).arg("ip").args(args.split(' ')).output().unwrap();
        assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn netlink(&self) -> Netlink {
        Netlink::open_in(&File::open(&self.1).unwrap()).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_cni_namespace_is_wired_to_a_tap_read_for_the_guest_and_unwired() {
    let ns = Netns::new();
    ns.ip("link add eth0 mtu 1400 type veth peer name peer0");
    ns.ip("addr add 10.77.0.5/24 dev eth0");
    ns.ip("link set eth0 up");
    ns.ip("link set peer0 up");
    ns.ip("route add default via 10.77.0.1");

    let (net, tap) = PodNetwork::attach(&ns.1).unwrap().expect("an interface to wire");
    let mut nl = ns.netlink();
    let eth0 = nl.link("eth0").unwrap();
    let x = &net.interface;
    assert_eq!((x.name.as_str(), Some(x.mac), x.mtu), ("eth0", eth0.mac, 1400));
    assert_eq!(x.addresses, ["10.77.0.5/24".parse::<IpNet>().unwrap()]);
    assert_eq!(
        x.routes,
        [Route::parse("default", "10.77.0.1").unwrap()],
        "the kernel's prefix route is the guest's own"
    );
    let t = nl.link(TAP_NAME).unwrap();
    assert_eq!((t.up, t.mtu), (true, 1400));
    assert_eq!((nl.ingress_filters(eth0.index).unwrap(), nl.ingress_filters(t.index).unwrap()), (1, 1));

    let req = net.interface.update_request("pod1", &"06".parse().unwrap());
    assert_eq!(req.container_id, "pod1");
    let i = &req.interfaces[0];
    assert_eq!((i.pci_path.as_str(), i.name.as_str(), i.mtu), ("06", "eth0", 1400));
    assert_eq!(i.mac, shoji_netlink::config::format_mac(&x.mac));
    assert_eq!(i.addresses, ["10.77.0.5/24"]);
    assert_eq!((req.routes[0].dest.as_str(), req.routes[0].gateway.as_str()), ("default", "10.77.0.1"));
    assert_eq!(req.routes[0].device, "eth0");

    // A second attach while wired fails (the tap's name is held by a live tap) and leaves the
    // first wiring as it was.
    assert!(PodNetwork::attach(&ns.1).is_err());
    assert_eq!((nl.ingress_filters(eth0.index).unwrap(), nl.ingress_filters(t.index).unwrap()), (1, 1));

    net.detach();
    assert_eq!((nl.ingress_filters(eth0.index).unwrap(), nl.ingress_filters(t.index).unwrap()), (0, 0));
    drop(tap);
    assert!(nl.link(TAP_NAME).is_err(), "the tap goes with the VM's fd");
    assert_eq!(nl.link("eth0").unwrap().mac, eth0.mac, "the veth is CNI's to remove");
}

#[test]
fn a_namespace_without_an_addressed_interface_has_nothing_to_wire() {
    let ns = Netns::new();
    assert!(PodNetwork::attach(&ns.1).unwrap().is_none(), "loopback only");
    ns.ip("link add eth0 type veth peer name peer0");
    assert!(PodNetwork::attach(&ns.1).unwrap().is_none(), "no address");
    let names: Vec<String> = ns.netlink().links().unwrap().into_iter().map(|l| l.name).collect();
    assert!(!names.iter().any(|n| n == TAP_NAME), "no tap made: {names:?}");
}

#[test]
fn a_missing_namespace_is_named() {
    let e = PodNetwork::attach(std::path::Path::new("/var/run/netns/shoji-no-such")).err().unwrap().to_string();
    assert!(e.starts_with("sandbox: pod network /var/run/netns/shoji-no-such: "), "{e}");
}
