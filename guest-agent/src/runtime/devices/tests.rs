use super::*;
use proptest::prelude::*;

/// Runs a device program the way the kernel's interpreter would, for the opcodes `program`
/// emits (anything else fails the test). Also checks what the verifier checks: jumps stay in
/// the program and every instruction is reachable.
fn run(p: &[Insn], kind: Kind, major: u32, minor: u32, access: u8) -> bool {
    let typ = kind.code().expect("a request has a real kind") as u64;
    let ctx = [(u64::from(access) << 16) | typ, major.into(), minor.into()];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    loop {
        let i = p[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        let imm = i.imm as i64 as u64;
        let mut next = pc + 1;
        let jump = |cond: bool| if cond { (pc as i64 + 1 + i64::from(i.off)) as usize } else { pc + 1 };
        match i.code {
            LDX_MEM_W => {
                assert_eq!(src, 1, "loads from the context only");
                r[dst] = ctx[(i.off / 4) as usize] & 0xffff_ffff;
            }
            ALU32_AND_K => r[dst] = (r[dst] & imm) & 0xffff_ffff,
            ALU32_RSH_K => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
            ALU64_AND_K => r[dst] &= imm,
            ALU64_MOV_K => r[dst] = imm,
            ALU64_MOV_X => r[dst] = r[src],
            JMP_JEQ_K => next = jump(r[dst] == imm),
            JMP_JNE_K => next = jump(r[dst] != imm),
            JMP_JNE_X => next = jump(r[dst] != r[src]),
            JMP_EXIT => return r[0] == 1,
            c => panic!("unexpected opcode {c:#x}"),
        }
        assert!(next < p.len(), "jump out of the program at {pc}");
        pc = next;
    }
}

/// Every instruction is the target of some path (the verifier rejects dead code).
fn all_reachable(p: &[Insn]) -> bool {
    let mut seen = vec![false; p.len()];
    let mut todo = vec![0usize];
    while let Some(pc) = todo.pop() {
        if pc >= p.len() || seen[pc] {
            continue;
        }
        seen[pc] = true;
        let i = p[pc];
        match i.code {
            JMP_EXIT => {}
            JMP_JEQ_K | JMP_JNE_K | JMP_JNE_X => {
                todo.push(pc + 1);
                todo.push((pc as i64 + 1 + i64::from(i.off)) as usize);
            }
            _ => todo.push(pc + 1),
        }
    }
    seen.into_iter().all(|s| s)
}

fn spec_rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow).set_typ(typ).set_major(major).set_minor(minor).set_access(Some(access.into()));
    r
}

/// Whether `r` decides a request: (kind, major, minor, access bits).
fn matches(r: &Rule, kind: Kind, major: u32, minor: u32, access: u8) -> bool {
    (r.kind == Kind::All || r.kind == kind)
        && r.major.is_none_or(|m| m == major)
        && r.minor.is_none_or(|m| m == minor)
        && if r.allow { access & !r.access == 0 } else { access & r.access != 0 }
}

/// What `rules` allows for one request: the reference the BPF program must agree with.
fn decide(rules: &[Rule], kind: Kind, major: u32, minor: u32, access: u8) -> bool {
    rules.iter().rev().find(|r| matches(r, kind, major, minor, access)).is_some_and(|r| r.allow)
}

const RW: u8 = ACC_READ | ACC_WRITE;

#[test]
fn defaults_deny_guest_devices_and_allow_the_standard_ones() {
    let rules = rules(None).unwrap();
    let p = program(&rules);
    assert!(all_reachable(&p));
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, 0), (136, 77)] {
        assert!(run(&p, Kind::Char, major, minor, RW), "c {major}:{minor}");
    }
    // The serial console, kmsg, a virtio disk, a loop device: denied for read and write.
    for (kind, major, minor) in [(Kind::Char, 4, 64), (Kind::Char, 1, 11), (Kind::Block, 253, 0), (Kind::Block, 7, 0)] {
        for access in [ACC_READ, ACC_WRITE, RW] {
            assert!(!run(&p, kind, major, minor, access), "{kind:?} {major}:{minor} access {access}");
        }
        // mknod alone is allowed (as runc does): the node cannot be opened.
        assert!(run(&p, kind, major, minor, ACC_MKNOD));
    }
    // Block devices with the numbers of the standard char devices are not standard.
    assert!(!run(&p, Kind::Block, 1, 3, ACC_READ));
}

#[test]
fn rules_come_in_order_and_the_last_match_decides() {
    let c = Some(LinuxDeviceType::C);
    let spec = [
        spec_rule(false, None, None, None, "rwm"),
        spec_rule(true, c, Some(1), Some(11), "rw"),
        spec_rule(false, c, Some(1), Some(11), "r"),
        spec_rule(true, Some(LinuxDeviceType::B), Some(7), None, "r"),
    ];
    let rules = rules(Some(&spec)).unwrap();
    let p = program(&rules);
    assert!(all_reachable(&p));
    assert!(run(&p, Kind::Char, 1, 11, ACC_WRITE));
    // The later deny of r takes read away, and a read+write open asks for r.
    assert!(!run(&p, Kind::Char, 1, 11, ACC_READ));
    assert!(!run(&p, Kind::Char, 1, 11, RW));
    // A wildcard minor; access beyond the rule's is denied.
    assert!(run(&p, Kind::Block, 7, 3, ACC_READ));
    assert!(!run(&p, Kind::Block, 7, 3, RW));
    assert!(!run(&p, Kind::Char, 7, 3, ACC_READ));
    // The defaults come after the spec's rules (runc): its deny-all does not remove /dev/null.
    assert!(run(&p, Kind::Char, 1, 3, RW));
}

#[test]
fn type_a_and_catch_alls() {
    // An allow-all from the spec: everything allowed, and the program stops at it (the spec's
    // earlier rules would be dead code).
    let spec =
        [spec_rule(false, None, None, None, "rwm"), spec_rule(true, Some(LinuxDeviceType::A), None, None, "rwm")];
    let rules = rules(Some(&spec)).unwrap();
    let p = program(&rules);
    assert!(all_reachable(&p));
    assert!(run(&p, Kind::Block, 8, 0, RW));
    assert!(run(&p, Kind::Char, 4, 64, ACC_WRITE));
    // "a" with a major number is not a catch-all: the major still has to match.
    let r = [Rule { allow: true, kind: Kind::All, major: Some(8), minor: None, access: ACC_ALL }];
    let p = program(&r);
    assert!(run(&p, Kind::Block, 8, 1, RW));
    assert!(run(&p, Kind::Char, 8, 1, RW));
    assert!(!run(&p, Kind::Char, 9, 1, ACC_READ));
    // An empty list denies everything.
    assert!(!run(&program(&[]), Kind::Char, 1, 3, ACC_READ));
}

#[test]
fn bad_rules_name_their_field() {
    let e = rules(Some(&[spec_rule(true, None, None, None, "rx")])).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.devices[0].access:"), "{e}");
    let e = rules(Some(&[spec_rule(true, Some(LinuxDeviceType::P), None, None, "r")])).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.devices[0].type:"), "{e}");
    let e = rules(Some(&[spec_rule(true, None, Some(5000), None, "r")])).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.devices[0].major:"), "{e}");
    // Negative numbers and a missing access are wildcards, as runc reads them.
    let r = rules(Some(&[spec_rule(true, None, Some(-1), None, "")])).unwrap();
    assert_eq!(r[0], Rule { allow: true, kind: Kind::All, major: None, minor: None, access: ACC_ALL });
}

/// The kernel's verifier accepts the programs (needs root, like the runtime tests).
#[test]
fn the_kernel_loads_the_programs() {
    let c = Some(LinuxDeviceType::C);
    let spec = [spec_rule(false, None, None, None, "rwm"), spec_rule(true, c, Some(1), Some(11), "w")];
    for rules in [rules(None).unwrap(), rules(Some(&spec)).unwrap(), Vec::new()] {
        load(&program(&rules)).unwrap();
    }
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    let num = |max: u32| prop_oneof![Just(None), (0..max).prop_map(Some)];
    (any::<bool>(), prop_oneof![Just(Kind::All), Just(Kind::Block), Just(Kind::Char)], num(4), num(4), 0u8..8)
        .prop_map(|(allow, kind, major, minor, access)| Rule { allow, kind, major, minor, access })
}

proptest! {
    /// The program decides every request as the rule list says, and has no dead code.
    #[test]
    fn program_agrees_with_the_rules(
        rules in proptest::collection::vec(arb_rule(), 0..12),
        block in any::<bool>(), major in 0u32..5, minor in 0u32..5, access in 1u8..8,
    ) {
        let p = program(&rules);
        prop_assert!(all_reachable(&p));
        let kind = if block { Kind::Block } else { Kind::Char };
        prop_assert_eq!(run(&p, kind, major, minor, access), decide(&rules, kind, major, minor, access));
    }
}
