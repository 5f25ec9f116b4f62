//! The layout shows the architecture, and stays that way: no two modules of `src/` use each other
//! (directly or around a circle), and no production function is longer than a reader can hold at
//! once. A module may use its own submodules (it declares them); every other use — `crate::…`,
//! `super::…` — is an arrow, and the arrows must not close a circle.
//!
//! The source is read as rustfmt writes it (CI checks that): a function ends at the first `}`
//! at its own indentation, and test modules (`#[cfg(test)]`, `tests.rs`) are left out.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest production function allowed, in lines.
const MAX_FUNCTION_LINES: usize = 120;

type Module = Vec<String>;

/// Every module of `src/` and its file.
fn modules() -> BTreeMap<Module, PathBuf> {
    let mut modules = BTreeMap::new();
    let mut folders = vec![support::repo().join("src")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                modules.insert(module_of(&path), path);
            }
        }
    }
    modules
}

fn module_of(path: &Path) -> Module {
    let relative = path
        .strip_prefix(support::repo().join("src"))
        .expect("under src");
    let mut module: Module = relative
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if matches!(
        module.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        module.pop();
    }
    module
}

/// The production part of a file: up to its test module.
fn production(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    match text.find("#[cfg(test)]\nmod tests") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// The paths of a `use` tree, flattened: `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn flatten(tree: &str) -> Vec<String> {
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(&tree);
        return vec![path.trim().to_owned()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let mut branches = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                branches.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    branches.push(&inner[start..]);
    branches
        .into_iter()
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .flat_map(|branch| flatten(branch).into_iter().map(|p| format!("{prefix}{p}")))
        .collect()
}

/// Every path a file names: its `use` trees (flattened), and `crate::…`/`super::…`/`self::…`
/// paths in code. `reexports_only` keeps the trees of `pub use` alone.
fn paths(text: &str, reexports_only: bool) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let head = before[line_start..].trim();
        let statement = rest[at + 4..].split(';').next().unwrap_or("");
        if matches!(head, "" | "pub" | "pub(crate)" | "pub(super)")
            && (!reexports_only || head.starts_with("pub"))
        {
            found.extend(flatten(statement));
        }
        rest = &rest[at + 4..];
    }
    if !reexports_only {
        found.extend(
            text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| {
                    ["crate::", "super::", "self::"]
                        .iter()
                        .any(|p| w.starts_with(p))
                })
                .map(str::to_owned),
        );
    }
    found
}

/// Where modules are, what they re-export, and how a path resolves to the module that defines
/// what it names.
struct Tree {
    modules: BTreeMap<Module, PathBuf>,
    /// (module, name) → the module whose item it re-exports.
    reexports: BTreeMap<(Module, String), Module>,
}

impl Tree {
    fn read() -> Tree {
        let modules = modules();
        let mut tree = Tree {
            modules,
            reexports: BTreeMap::new(),
        };
        let mut reexports = BTreeMap::new();
        for (module, file) in &tree.modules {
            for path in paths(&production(file), true) {
                let Some(name) = path.rsplit("::").next().map(str::to_owned) else {
                    continue;
                };
                if let Some(target) = tree.resolve(module, file, &path) {
                    reexports.insert((module.clone(), name), target);
                }
            }
        }
        tree.reexports = reexports;
        tree
    }

    /// The module a path (from `module`, in `file`) names, or the one defining the item it names.
    fn resolve(&self, module: &Module, file: &Path, path: &str) -> Option<Module> {
        let folder = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let here: Module = if folder {
            module.clone()
        } else {
            module[..module.len().saturating_sub(1)].to_vec()
        };
        let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut base = match segments.first() {
            Some(&"crate") => Vec::new(),
            Some(&"super") => here[..here.len().saturating_sub(1)].to_vec(),
            // `self::…`, and a path that starts with a submodule's name.
            _ => here.clone(),
        };
        if matches!(segments.first(), Some(&("crate" | "super" | "self"))) {
            segments.remove(0);
        }
        while segments.first() == Some(&"super") {
            segments.remove(0);
            base.pop();
        }
        let full: Module = base
            .into_iter()
            .chain(segments.iter().map(|s| (*s).to_owned()))
            .collect();
        let mut found = (0..=full.len())
            .rev()
            .map(|n| full[..n].to_vec())
            .find(|m| self.modules.contains_key(m))?;
        // Through re-exports, to where the item is defined.
        let mut hops = 0;
        while let Some(name) = full.get(found.len())
            && let Some(target) = self.reexports.get(&(found.clone(), name.clone()))
            && hops < 8
        {
            found = target.clone();
            hops += 1;
        }
        (!found.is_empty()).then_some(found)
    }

    /// The modules a module uses: every path it names, resolved; not itself, not its own parts.
    fn uses(&self, module: &Module, file: &Path) -> BTreeSet<Module> {
        let mut found: BTreeSet<Module> = paths(&production(file), false)
            .iter()
            .filter_map(|path| self.resolve(module, file, path))
            .collect();
        found.retain(|target| target != module && !target.starts_with(module));
        found
    }
}

/// The circles of a graph: its strongly connected components of more than one module.
fn circles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    // Kosaraju: finish order on the graph, then components on its reverse.
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        seen: &mut BTreeSet<Module>,
        out: &mut Vec<Module>,
    ) {
        if !seen.insert(node.clone()) {
            return;
        }
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, seen, out);
        }
        out.push(node.clone());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, tos) in graph {
        for to in tos {
            reverse.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut components = Vec::new();
    for node in order.iter().rev() {
        let mut component = Vec::new();
        visit(node, &reverse, &mut seen, &mut component);
        if component.len() > 1 {
            components.push(component);
        }
    }
    components
}

#[test]
fn no_two_modules_of_src_use_each_other_even_around_a_circle() {
    let tree = Tree::read();
    assert!(
        tree.modules.len() > 50,
        "src/ read: {} modules",
        tree.modules.len()
    );
    let graph: BTreeMap<Module, BTreeSet<Module>> = tree
        .modules
        .iter()
        .map(|(module, file)| (module.clone(), tree.uses(module, file)))
        .collect();
    // The reader works: known arrows are found.
    let arrow = |from: &str, to: &str| {
        let split = |m: &str| m.split("::").map(str::to_owned).collect::<Module>();
        graph
            .get(&split(from))
            .is_some_and(|tos| tos.contains(&split(to)))
    };
    assert!(arrow("sync::syncer", "images::manager"));
    assert!(
        arrow("status", "sync::report"),
        "through sync's re-export of NodeReport"
    );
    assert!(
        arrow("status", "sync::report"),
        "through sync's re-export of NodeReport"
    );
    let found: Vec<String> = circles(&graph)
        .iter()
        .map(|circle| {
            circle
                .iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    assert!(
        found.is_empty(),
        "modules that use each other:\n{}",
        found.join("\n")
    );
}

/// Every production function with a body: its name, first line and length in lines.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        let qualifiers = [
            "pub",
            "pub(super)",
            "pub(crate)",
            "async",
            "const",
            "unsafe",
        ];
        if !words[..at].iter().all(|w| qualifiers.contains(w)) {
            continue;
        }
        // Where the signature ends: `{` opens a body, `;` is a declaration without one.
        let Some(open) = lines[start..]
            .iter()
            .position(|l| l.ends_with('{') || l.ends_with(';') || l.ends_with('}'))
        else {
            continue;
        };
        if !lines[start + open].ends_with('{') {
            continue;
        }
        let closing = format!("{}}}", &line[..line.len() - trimmed.len()]);
        let Some(end) = lines[start..].iter().position(|l| *l == closing) else {
            continue;
        };
        let name = words
            .get(at + 1)
            .map_or("", |w| w.split(['(', '<']).next().unwrap_or(w));
        found.push((name.to_owned(), start + 1, end + 1));
    }
    found
}

#[test]
fn no_production_function_is_longer_than_a_reader_can_hold() {
    let mut long = Vec::new();
    for file in modules().values() {
        for (name, line, length) in functions(&production(file)) {
            if length > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}:{line}: {name} is {length} lines",
                    file.strip_prefix(support::repo()).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}
