//! The rules of the house, checked on the real dependency graph (`cargo tree`): the shim never
//! links the guest agent or the CLI's libraries; the sandbox session knows no command line; the
//! CLI and the shim reach the agent only through the session (the protocol crate is no direct
//! dependency of theirs); the VMM library depends on neither the session nor the CLI; the device
//! model owns no VM.
use std::collections::BTreeSet;
use std::process::Command;

/// The packages in `package`'s normal dependency tree (`depth`: None for all of it).
fn deps(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", package]);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if let Some(d) = depth {
        cmd.args(["--depth", &d.to_string()]);
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).filter(|n| n != package).collect()
}

fn none_of(package: &str, found: &BTreeSet<String>, banned: &[&str]) {
    let bad: Vec<&&str> = banned.iter().filter(|b| found.contains(**b)).collect();
    assert!(bad.is_empty(), "{package} depends on {bad:?}");
}

#[test]
fn the_shim_links_neither_the_agent_nor_the_cli_libraries() {
    let d = deps("containerd-shim-shoji-v2", None);
    assert!(d.contains("shoji-sandbox"), "the shim stands on the sandbox crate: {d:?}");
    none_of("the shim", &d, &["shoji-agent", "shoji-cli", "plotters", "indicatif", "clap", "tar", "flate2"]);
}

#[test]
fn the_session_knows_no_command_line_and_builds_nothing() {
    let d = deps("shoji-sandbox", None);
    none_of("shoji-sandbox", &d, &["shoji-agent", "shoji-cli", "plotters", "indicatif", "clap", "tar", "flate2"]);
}

#[test]
fn front_ends_speak_to_the_agent_only_through_the_session() {
    for front in ["shoji-cli", "containerd-shim-shoji-v2"] {
        let direct = deps(front, Some(1));
        none_of(front, &direct, &["shoji-protocol", "ttrpc", "shoji-agent"]);
    }
}

#[test]
fn the_vmm_library_depends_on_neither_the_session_nor_the_cli() {
    let d = deps("shoji-vmm", None);
    none_of("shoji-vmm", &d, &["shoji-sandbox", "shoji-cli", "shoji-protocol", "shoji-agent", "clap"]);
}

#[test]
fn devices_own_no_vm() {
    let d = deps("shoji-devices", None);
    none_of("shoji-devices", &d, &["kvm-ioctls", "kvm-bindings", "shoji-vmm", "shoji-sandbox"]);
}

/// The module a source file is: `run/mod.rs` and `run.rs` are `run`, `run/image.rs` is
/// `run::image`, `main.rs`/`lib.rs` the root ("").
fn module_of(rel: &std::path::Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "main" | "lib") || !parts.is_empty() && stem != "mod" {
        parts.push(stem.to_string());
    }
    parts
}

/// The paths of a use-tree: `a::{b, c::{d, self}}` is a::b, a::c::d, a::c.
fn use_tree(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let mut p = prefix.to_vec();
        p.extend(tree[..open].split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from));
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    use_tree(&p, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        use_tree(&p, &inner[start..], out);
        return;
    }
    let mut p = prefix.to_vec();
    p.extend(tree.split("::").map(str::trim).filter(|s| !s.is_empty() && *s != "self").map(String::from));
    if p.len() > prefix.len() || tree == "self" {
        out.push(p);
    }
}

/// Paths a file's code names (comments aside): `crate::a::b`, `super::a`, and use-trees
/// such as `use crate::{a, b::{c, d}}`.
fn named_paths(text: &str) -> Vec<(String, Vec<String>)> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for root in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().last();
            rest = &rest[at + root.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // The path up to the end of its use-tree (balanced braces) or of the word.
            let end = if rest.starts_with(|c: char| word(c) || c == '{') {
                let mut depth = 0;
                let mut end = rest.len();
                for (i, c) in rest.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth > 0 => {
                            depth -= 1;
                            if depth == 0 {
                                end = i + 1;
                                break;
                            }
                        }
                        c if depth == 0 && !word(c) => {
                            end = i;
                            break;
                        }
                        _ => {}
                    }
                }
                end
            } else {
                0
            };
            let mut paths = Vec::new();
            use_tree(&[], &rest[..end], &mut paths);
            out.extend(paths.into_iter().map(|p| (root.to_string(), p)));
        }
    }
    out
}

/// The module graph of a crate's `src/`: an edge A -> B when a file of A names a path into B
/// (B neither A nor an ancestor of A: a module using its parent's items is containment).
fn module_graph(src: &std::path::Path) -> std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let modules: BTreeSet<Vec<String>> = all.iter().map(|f| module_of(f.strip_prefix(src).unwrap())).collect();
    let mut graph = std::collections::BTreeMap::<Vec<String>, BTreeSet<Vec<String>>>::new();
    for f in &all {
        let me = module_of(f.strip_prefix(src).unwrap());
        let text = std::fs::read_to_string(f).unwrap();
        // Test modules may reach anywhere.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let is_dir_module = f.file_name().is_some_and(|n| n == "mod.rs");
        for (root, path) in named_paths(text) {
            let mut target = if root == "crate::" {
                Vec::new()
            } else {
                // `super` of `a/b.rs` (module a::b) is `a`; of `a/mod.rs` (module a) the root.
                let mut t = me.clone();
                let _ = is_dir_module;
                t.pop();
                t
            };
            // The longest prefix of the named path that is a module.
            let mut best = None;
            for seg in path {
                target.push(seg);
                if modules.contains(&target) {
                    best = Some(target.clone());
                }
            }
            if let Some(t) = best {
                if t != me && !me.starts_with(&t) {
                    graph.entry(me.clone()).or_default().insert(t);
                }
            }
        }
    }
    graph
}

/// A cycle in the graph, if any.
fn find_cycle(graph: &std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    fn dfs(
        n: &Vec<String>,
        g: &std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut std::collections::BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut c: Vec<String> = stack[at..].iter().map(|x| x.join("::")).collect();
                    c.push(m.join("::"));
                    return Some(c);
                }
                0 => {
                    if let Some(c) = dfs(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = std::collections::BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = dfs(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let ws = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    for krate in ["vmm", "devices", "sandbox", "cli", "shim"] {
        let g = module_graph(&ws.join(krate).join("src"));
        if let Some(c) = find_cycle(&g) {
            panic!("{krate}: an import circle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_circle_finder_finds_circles() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let mut g = std::collections::BTreeMap::new();
    g.insert(m("run"), BTreeSet::from([m("detached")]));
    g.insert(m("detached"), BTreeSet::from([m("run::spec")]));
    g.insert(m("run::spec"), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
    g.insert(m("run::spec"), BTreeSet::from([m("detached")]));
    assert_eq!(find_cycle(&g), Some(vec!["detached".into(), "run::spec".into(), "detached".into()]));
    assert_eq!(module_of(std::path::Path::new("run/mod.rs")), m("run"));
    assert_eq!(module_of(std::path::Path::new("run/image.rs")), m("run::image"));
    assert_eq!(module_of(std::path::Path::new("main.rs")), Vec::<String>::new());
    assert_eq!(module_of(std::path::Path::new("bench.rs")), m("bench"));
    let p = named_paths("use crate::{run::{self, Io}, detached};\n// crate::x\nx = super::boot::f(); crate::a::b;");
    for (root, path) in [("crate::", "run"), ("crate::", "run::Io"), ("crate::", "detached"), ("super::", "boot::f")] {
        assert!(p.contains(&(root.into(), m(path))), "{root}{path}: {p:?}");
    }
    assert!(p.contains(&("crate::".into(), m("a::b"))), "{p:?}");
    assert!(!p.iter().any(|(_, x)| x == &m("x")), "comments name nothing: {p:?}");
}
