use std::path::Path;

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, LinuxResources, Spec};
use proptest::prelude::*;

use super::*;

use LinuxDeviceType::{A, B, C, P, U};

fn dev(path: &str, typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDevice {
    let mut d = LinuxDevice::default();
    d.set_path(path.into()).set_typ(typ).set_major(major).set_minor(minor).set_file_mode(Some(0o666));
    d
}

fn rule(typ: Option<LinuxDeviceType>, major: Option<i64>, minor: Option<i64>) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(true).set_typ(typ).set_major(major).set_minor(minor).set_access(Some("rwm".into()));
    r
}

fn rule_n(typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDeviceCgroup {
    rule(Some(typ), Some(major), Some(minor))
}

fn spec(devices: Vec<LinuxDevice>, rules: Option<Vec<LinuxDeviceCgroup>>) -> Spec {
    let mut spec = Spec::default();
    let linux = spec.linux_mut().as_mut().unwrap();
    linux.set_devices(Some(devices));
    linux.set_resources(rules.map(|r| {
        let mut res = LinuxResources::default();
        res.set_devices(Some(r));
        res
    }));
    spec
}

fn upd(path: &str, major: i64, minor: i64) -> DeviceUpdate {
    DeviceUpdate { container_path: path.into(), guest_major: major, guest_minor: minor, final_path: None }
}

fn json(spec: &Spec) -> String {
    serde_json::to_string(spec).unwrap()
}

fn devices(spec: &Spec) -> Vec<(String, i64, i64)> {
    let devs = spec.linux().as_ref().unwrap().devices().clone().unwrap_or_default();
    devs.iter().map(|d| (d.path().to_string_lossy().into_owned(), d.major(), d.minor())).collect()
}

fn rules(spec: &Spec) -> Vec<LinuxDeviceCgroup> {
    let linux = spec.linux().as_ref().unwrap();
    linux.resources().as_ref().and_then(|r| r.devices().clone()).unwrap_or_default()
}

/// Applies and checks that an error left the spec byte-identical; returns the error.
fn apply_err(spec: &mut Spec, updates: &[DeviceUpdate]) -> SpecRewriteError {
    let before = json(spec);
    let err = apply_device_updates(spec, updates).unwrap_err();
    assert_eq!(json(spec), before, "spec changed on error {err}");
    err
}

#[test]
fn guest_numbers_equal_to_another_devices_host_numbers_are_not_translated_twice() {
    // /dev/a is host null (1:3) -> guest zero (1:5); /dev/b is host zero (1:5) -> guest full (1:7).
    let mut s =
        spec(vec![dev("/dev/a", C, 1, 3), dev("/dev/b", C, 1, 5)], Some(vec![rule_n(C, 1, 3), rule_n(C, 1, 5)]));
    apply_device_updates(&mut s, &[upd("/dev/a", 1, 5), upd("/dev/b", 1, 7)]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/a".into(), 1, 5), ("/dev/b".into(), 1, 7)]);
    assert_eq!(rules(&s), vec![rule_n(C, 1, 5), rule_n(C, 1, 7)]);

    // The same with the updates given in the other order, and the rules too.
    let mut s =
        spec(vec![dev("/dev/a", C, 1, 3), dev("/dev/b", C, 1, 5)], Some(vec![rule_n(C, 1, 5), rule_n(C, 1, 3)]));
    apply_device_updates(&mut s, &[upd("/dev/b", 1, 7), upd("/dev/a", 1, 5)]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/a".into(), 1, 5), ("/dev/b".into(), 1, 7)]);
    assert_eq!(rules(&s), vec![rule_n(C, 1, 7), rule_n(C, 1, 5)]);
}

#[test]
fn two_devices_swapping_numbers() {
    let mut s = spec(
        vec![dev("/dev/vda", B, 8, 0), dev("/dev/vdb", B, 8, 16)],
        Some(vec![rule_n(B, 8, 16), rule_n(B, 8, 0), rule_n(B, 8, 0)]),
    );
    apply_device_updates(&mut s, &[upd("/dev/vda", 8, 16), upd("/dev/vdb", 8, 0)]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/vda".into(), 8, 16), ("/dev/vdb".into(), 8, 0)]);
    assert_eq!(rules(&s), vec![rule_n(B, 8, 0), rule_n(B, 8, 16), rule_n(B, 8, 16)]);
}

#[test]
fn char_and_block_with_the_same_numbers_do_not_mix() {
    let mut s = spec(
        vec![dev("/dev/char", C, 99, 99), dev("/dev/block", B, 99, 99)],
        Some(vec![rule_n(B, 99, 99), rule_n(C, 99, 99), rule_n(U, 99, 99)]),
    );
    apply_device_updates(&mut s, &[upd("/dev/char", 1, 3)]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/char".into(), 1, 3), ("/dev/block".into(), 99, 99)]);
    // `u` is unbuffered char: the same number space as `c`.
    assert_eq!(rules(&s), vec![rule_n(B, 99, 99), rule_n(C, 1, 3), rule_n(U, 1, 3)]);

    // A `u` device is matched by `c` rules.
    let mut s =
        spec(vec![dev("/dev/u", U, 5, 1), dev("/dev/b", B, 5, 1)], Some(vec![rule_n(C, 5, 1), rule_n(B, 5, 1)]));
    apply_device_updates(&mut s, &[upd("/dev/u", 4, 64)]).unwrap();
    assert_eq!(rules(&s), vec![rule_n(C, 4, 64), rule_n(B, 5, 1)]);
}

#[test]
fn final_path_replaces_the_path() {
    let mut s = spec(vec![dev("/dev/original", B, 8, 0), dev("/dev/other", B, 8, 1)], None);
    let update = DeviceUpdate { final_path: Some("/dev/new".into()), ..upd("/dev/original", 253, 1) };
    apply_device_updates(&mut s, &[update]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/new".into(), 253, 1), ("/dev/other".into(), 8, 1)]);
    // Everything else of the entry is kept.
    let d = &s.linux().as_ref().unwrap().devices().as_ref().unwrap()[0];
    assert_eq!((d.typ(), d.file_mode()), (B, Some(0o666)));
}

#[test]
fn wildcard_and_unrelated_rules_are_left_alone() {
    let untouched = vec![
        rule(Some(A), None, None),
        rule(Some(A), Some(8), Some(0)),
        rule(None, Some(8), Some(0)),
        rule(Some(B), None, Some(0)),
        rule(Some(B), Some(8), None),
        rule(Some(B), None, None),
        rule(Some(P), Some(8), Some(0)),
        rule_n(B, 8, 1),
        rule_n(C, 8, 0),
    ];
    let mut all = untouched.clone();
    all.push(rule_n(B, 8, 0));
    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], Some(all));
    apply_device_updates(&mut s, &[upd("/dev/vda", 253, 0)]).unwrap();
    let mut expected = untouched;
    expected.push(rule_n(B, 253, 0));
    assert_eq!(rules(&s), expected);
}

#[test]
fn allow_and_access_of_a_rewritten_rule_are_kept() {
    let mut deny = rule_n(B, 8, 0);
    deny.set_allow(false).set_access(Some("w".into()));
    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], Some(vec![deny.clone()]));
    apply_device_updates(&mut s, &[upd("/dev/vda", 253, 0)]).unwrap();
    deny.set_major(Some(253));
    assert_eq!(rules(&s), vec![deny]);
}

#[test]
fn no_resources_and_no_updates_are_fine() {
    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], None);
    apply_device_updates(&mut s, &[upd("/dev/vda", 253, 0)]).unwrap();
    assert_eq!(devices(&s), vec![("/dev/vda".into(), 253, 0)]);

    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], Some(vec![rule_n(B, 8, 0)]));
    let before = json(&s);
    apply_device_updates(&mut s, &[]).unwrap();
    assert_eq!(json(&s), before);

    let mut s = Spec::default();
    s.set_linux(None);
    apply_device_updates(&mut s, &[]).unwrap();
}

#[test]
fn no_linux_section_is_an_error() {
    let mut s = Spec::default();
    s.set_linux(None);
    let err = apply_err(&mut s, &[upd("/dev/vda", 253, 0)]);
    assert!(matches!(err, SpecRewriteError::NoLinux { .. }), "{err:?}");
    assert!(err.to_string().contains("/dev/vda"), "{err}");
}

#[test]
fn two_updates_for_one_path_is_an_error() {
    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], Some(vec![rule_n(B, 8, 0)]));
    let err = apply_err(&mut s, &[upd("/dev/vda", 253, 0), upd("/dev/vda", 253, 1)]);
    assert_eq!(err, SpecRewriteError::DuplicateUpdate { path: "/dev/vda".into() });
    assert!(err.to_string().contains("/dev/vda"), "{err}");
}

#[test]
fn two_updated_devices_with_the_same_host_numbers_is_an_error() {
    let mut s = spec(vec![dev("/dev/x", B, 8, 0), dev("/dev/y", B, 8, 0)], Some(vec![rule_n(B, 8, 0)]));
    let err = apply_err(&mut s, &[upd("/dev/x", 253, 0), upd("/dev/y", 253, 1)]);
    assert!(matches!(err, SpecRewriteError::ConflictingHostNumbers { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/dev/x") && msg.contains("/dev/y") && msg.contains("b 8:0"), "{msg}");

    // `u` and `c` are one number space.
    let mut s = spec(vec![dev("/dev/x", C, 4, 1), dev("/dev/y", U, 4, 1)], None);
    let err = apply_err(&mut s, &[upd("/dev/x", 1, 3), upd("/dev/y", 1, 5)]);
    assert!(matches!(err, SpecRewriteError::ConflictingHostNumbers { .. }), "{err:?}");

    // Only updated devices count: an untouched device may share numbers.
    let mut s = spec(vec![dev("/dev/x", B, 8, 0), dev("/dev/y", B, 8, 0)], None);
    apply_device_updates(&mut s, &[upd("/dev/x", 253, 0)]).unwrap();
}

#[test]
fn an_update_matching_no_device_is_an_error() {
    let mut s = spec(vec![dev("/dev/vda", B, 8, 0)], Some(vec![rule_n(B, 8, 0)]));
    let err = apply_err(&mut s, &[upd("/dev/vda", 253, 0), upd("/dev/nope", 253, 1)]);
    assert_eq!(err, SpecRewriteError::MissingDevices { paths: vec!["/dev/nope".into()] });
    assert!(err.to_string().contains("/dev/nope"), "{err}");

    // No linux.devices at all.
    let mut s = spec(vec![], None);
    s.linux_mut().as_mut().unwrap().set_devices(None);
    let err = apply_err(&mut s, &[upd("/dev/vda", 253, 0)]);
    assert!(matches!(err, SpecRewriteError::MissingDevices { .. }), "{err:?}");
}

#[test]
fn fifo_and_duplicate_device_entries_are_errors() {
    let mut s = spec(vec![dev("/dev/fifo", P, 0, 0)], None);
    let err = apply_err(&mut s, &[upd("/dev/fifo", 1, 3)]);
    assert!(matches!(err, SpecRewriteError::NotADeviceNode { .. }), "{err:?}");
    assert!(err.to_string().contains("/dev/fifo"), "{err}");

    let mut s = spec(vec![dev("/dev/vda", B, 8, 0), dev("/dev/vda", B, 8, 1)], None);
    let err = apply_err(&mut s, &[upd("/dev/vda", 253, 0)]);
    assert_eq!(err, SpecRewriteError::DuplicateDevicePath { path: "/dev/vda".into() });
}

// ---- property test against a reference model ----

const TYPES: [LinuxDeviceType; 3] = [B, C, U];

/// Each update applied to the ORIGINAL spec on its own: devices by path, rules by the
/// original host (type, major, minor) of the one updated device they name.
fn model(orig: &Spec, updates: &[DeviceUpdate]) -> Spec {
    let orig_devs = orig.linux().as_ref().unwrap().devices().clone().unwrap_or_default();
    let update_of = |d: &LinuxDevice| updates.iter().find(|u| Path::new(&u.container_path) == d.path());
    let mut out = orig.clone();
    let linux = out.linux_mut().as_mut().unwrap();
    for d in linux.devices_mut().iter_mut().flatten() {
        if let Some(u) = update_of(&d.clone()) {
            d.set_major(u.guest_major).set_minor(u.guest_minor);
            if let Some(p) = &u.final_path {
                d.set_path(p.into());
            }
        }
    }
    let rules = linux.resources_mut().as_mut().and_then(|r| r.devices_mut().as_mut());
    for r in rules.into_iter().flatten() {
        let Some(rt) = r.typ().and_then(NodeType::of) else { continue };
        let hits: Vec<&DeviceUpdate> = orig_devs
            .iter()
            .filter(|d| {
                NodeType::of(d.typ()) == Some(rt) && Some(d.major()) == r.major() && Some(d.minor()) == r.minor()
            })
            .filter_map(update_of)
            .collect();
        assert!(hits.len() <= 1, "model precondition: unique host numbers among updated devices");
        if let Some(u) = hits.first() {
            r.set_major(Some(u.guest_major)).set_minor(Some(u.guest_minor));
        }
    }
    out
}

/// Devices with colliding numbers (small ranges), unique paths.
fn devices_strategy() -> impl Strategy<Value = Vec<LinuxDevice>> {
    prop::collection::vec((prop::sample::select(TYPES.to_vec()), 0i64..3, 0i64..3), 1..8)
        .prop_map(|v| v.into_iter().enumerate().map(|(i, (t, ma, mi))| dev(&format!("/dev/d{i}"), t, ma, mi)).collect())
}

/// A rule drawn from a device's numbers (maybe the other type), a wildcard or unrelated numbers.
fn rule_strategy(n_devices: usize, devs: Vec<LinuxDevice>) -> impl Strategy<Value = LinuxDeviceCgroup> {
    let typ = prop::sample::select(vec![A, B, C, U]);
    let from_device = (0..n_devices, prop::option::of(prop::sample::select(TYPES.to_vec()))).prop_map(move |(i, t)| {
        let d = &devs[i];
        rule_n(t.unwrap_or(d.typ()), d.major(), d.minor())
    });
    let wildcard = (prop::option::of(typ.clone()), prop::option::of(0i64..3), prop::option::of(0i64..3))
        .prop_map(|(t, ma, mi)| rule(t, ma, mi));
    let unrelated = (typ, 0i64..200, 0i64..200).prop_map(|(t, ma, mi)| rule_n(t, ma, mi));
    prop_oneof![4 => from_device, 2 => wildcard, 1 => unrelated]
}

/// A spec with devices, maybe cgroup rules, and the updates for a random subset of devices
/// (unique host numbers among them), in random order, with guest numbers in the same small
/// ranges, so they often equal other devices' host numbers.
fn case_strategy() -> impl Strategy<Value = (Spec, Vec<DeviceUpdate>)> {
    devices_strategy()
        .prop_flat_map(|devs| {
            let n = devs.len();
            let rules = prop::option::of(prop::collection::vec(rule_strategy(n, devs.clone()), 0..12));
            let picks =
                prop::collection::vec((any::<bool>(), 0i64..3, 0i64..3, prop::option::weighted(0.2, 0..4u8)), n);
            let order = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
            (Just(devs), rules, picks, order)
        })
        .prop_map(|(devs, rules, picks, order)| {
            let mut seen = HashSet::new();
            let mut updates = Vec::new();
            for i in order {
                let (wanted, ma, mi, fp) = picks[i];
                let d = &devs[i];
                if wanted && seen.insert((NodeType::of(d.typ()), d.major(), d.minor())) {
                    updates.push(DeviceUpdate {
                        container_path: d.path().to_string_lossy().into_owned(),
                        guest_major: ma,
                        guest_minor: mi,
                        final_path: fp.map(|f| format!("/dev/final{f}")),
                    });
                }
            }
            (spec(devs, rules), updates)
        })
}

/// Like [`case_strategy`] but with updates that may break the rules: paths that are not in the
/// spec, several updates for one path, updated devices sharing host numbers.
fn any_case_strategy() -> impl Strategy<Value = (Spec, Vec<DeviceUpdate>)> {
    devices_strategy().prop_flat_map(|devs| {
        let n = devs.len();
        let rules = prop::option::of(prop::collection::vec(rule_strategy(n, devs.clone()), 0..12));
        let update = (0..n + 1, 0i64..3, 0i64..3).prop_map(move |(i, ma, mi)| {
            let path = if i == n { "/dev/not-there".to_string() } else { format!("/dev/d{i}") };
            upd(&path, ma, mi)
        });
        (Just(devs), rules, prop::collection::vec(update, 0..5)).prop_map(|(d, r, u)| (spec(d, r), u))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn batch_equals_each_update_applied_to_the_original((orig, updates) in case_strategy()) {
        let mut got = orig.clone();
        apply_device_updates(&mut got, &updates).unwrap();
        prop_assert_eq!(json(&got), json(&model(&orig, &updates)));
    }

    #[test]
    fn invalid_batches_fail_and_leave_the_spec_alone((orig, updates) in any_case_strategy()) {
        let devs = orig.linux().as_ref().unwrap().devices().clone().unwrap_or_default();
        let mut paths = HashSet::new();
        let dup_path = !updates.iter().all(|u| paths.insert(u.container_path.as_str()));
        let missing = updates.iter().any(|u| !devs.iter().any(|d| Path::new(&u.container_path) == d.path()));
        let mut numbers = HashSet::new();
        let shared_numbers = !devs
            .iter()
            .filter(|d| updates.iter().any(|u| Path::new(&u.container_path) == d.path()))
            .all(|d| numbers.insert((NodeType::of(d.typ()), d.major(), d.minor())));
        let should_fail = dup_path || missing || shared_numbers;

        let mut got = orig.clone();
        match apply_device_updates(&mut got, &updates) {
            Ok(()) => {
                prop_assert!(!should_fail, "accepted {:?}", updates);
                prop_assert_eq!(json(&got), json(&model(&orig, &updates)));
            }
            Err(e) => {
                prop_assert!(should_fail, "rejected {:?}: {}", updates, e);
                prop_assert_eq!(json(&got), json(&orig));
            }
        }
    }
}
