//! The code's layout: data flows one way, so no module imports a module that imports it back.
//! Every `crate::…` and `super::…` path outside comments and test modules is an edge from the
//! module of its file to the module it names (a parent and its own children excepted: a registry
//! in `sinks/mod.rs` names its backends, which implement the trait it defines). Only `engine`
//! may name tract.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/service/sinks/mod.rs` → `crate::service::sinks`.
fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut module: Module = vec!["crate".into()];
    module.extend(relative.iter().map(|p| p.to_string_lossy().into_owned()));
    if matches!(
        module.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        module.pop();
    }
    module
}

/// The code of a file without its comments and without its `#[cfg(test)] mod tests`.
fn code_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i] == "#[cfg(test)]"
                && lines
                    .get(i + 1)
                    .is_some_and(|next| next.ends_with("mod tests {"))
        })
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` or `super::super::c` path in `code`, resolved from `module`.
fn paths_named(module: &Module, code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < code.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let starts = (rest.starts_with("crate::") || rest.starts_with("super::"))
            && (i == 0 || !is_ident(bytes[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let segments: Vec<&str> = rest[..end].split("::").filter(|s| !s.is_empty()).collect();
        let mut target = if segments[0] == "crate" {
            vec!["crate".to_string()]
        } else {
            module.clone()
        };
        let mut k = usize::from(segments[0] == "crate");
        while k < segments.len() && segments[k] == "super" {
            target.pop();
            k += 1;
        }
        target.extend(segments[k..].iter().map(|s| s.to_string()));
        i += end;
        if code[i..].starts_with('{') {
            // `use super::{a::B, c}`: each item of the group, from the group's module.
            let group = braced(&code[i..]);
            for item in split_top_level(&group[1..group.len() - 1]) {
                let item: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut named = target.clone();
                named.extend(
                    item.split("::")
                        .filter(|s| !s.is_empty() && *s != "self")
                        .map(String::from),
                );
                out.push(named);
            }
            i += group.len();
        } else {
            out.push(target);
        }
    }
    out
}

/// `{ ... }` at the start of `code`, braces balanced.
fn braced(code: &str) -> &str {
    let mut depth = 0;
    for (i, c) in code.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &code[..=i];
                }
            }
            _ => {}
        }
    }
    code
}

/// The comma-separated items of a group, nested groups kept whole.
fn split_top_level(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// The module dependency graph at `depth` path segments, parents and children not linked.
fn graph(depth: usize) -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    let owner = |path: &Module| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|m| modules.contains(m))
    };
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let from: Module = module.iter().take(depth).cloned().collect();
        for path in paths_named(&module, &code) {
            let Some(target) = owner(&path) else { continue };
            let to: Module = target.into_iter().take(depth).collect();
            if !is_prefix(&from, &to) && !is_prefix(&to, &from) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one: the modules on it.
fn cycle_from(graph: &BTreeMap<Module, BTreeSet<Module>>, start: &Module) -> Option<Vec<Module>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for depth in [2, 3, 4] {
        let graph = graph(depth);
        assert!(
            graph.len() > 5,
            "the graph at depth {depth} is implausibly small"
        );
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
                panic!("import cycle: {} → back", names.join(" → "));
            }
        }
    }
}

#[test]
fn the_checker_sees_a_cycle_and_resolves_super() {
    let module: Module = vec!["crate".into(), "service".into(), "runtime".into()];
    let named = paths_named(
        &module,
        "use super::control::X; crate::engine::Y; notsuper::z; use super::{a::B, c, d::{E, F}};",
    );
    assert_eq!(
        named,
        vec![
            vec!["crate", "service", "control", "X"],
            vec!["crate", "engine", "Y"],
            vec!["crate", "service", "a", "B"],
            vec!["crate", "service", "c"],
            vec!["crate", "service", "d"],
        ]
        .into_iter()
        .map(|m| m.into_iter().map(String::from).collect::<Module>())
        .collect::<Vec<_>>()
    );
    let a: Module = vec!["crate".into(), "a".into()];
    let b: Module = vec!["crate".into(), "b".into()];
    let graph = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([a.clone()])),
    ]);
    assert_eq!(cycle_from(&graph, &a), Some(vec![a.clone(), b.clone()]));
}

#[test]
fn only_engine_names_tract() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files {
        if file.starts_with(src.join("engine")) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        assert!(
            !code.contains("tract_"),
            "{} names tract: only engine/ may",
            file.display()
        );
    }
}
