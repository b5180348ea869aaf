//! The library's top-level modules import one another without a cycle and without an
//! upward arrow: each `crate::x` path in a module's (non-test) source is an arrow to `x`;
//! the graph of arrows must have no strongly connected component larger than one module,
//! and every arrow must point to a lower layer of [`LAYERS`]. A new cycle or upward arrow
//! fails here with the modules in it; a new module fails until it is given a layer.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// The layers, lowest first: the loop's data flow (observe, model, decide, act, publish)
/// from the bottom up. A module may use only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    // Leaves: helpers and plain data.
    &["util", "sketch", "heat", "addresses", "http_auth"],
    // Read-only observers of the host, the settings, the hardened HTTP loop.
    &["host", "config", "http"],
    // Observers of the guests: the probes and the page scanner.
    &["probes", "scan"],
    // The pure joins: VM states, ranking.
    &["model"],
    // Pure decisions.
    &["policy"],
    // The only writer; the published documents.
    &["actuate", "wire"],
    // The loop's steps: decide and act.
    &["control"],
    // Other hosts.
    &["fabric"],
    // Moving a VM to another host through the fabric's channel.
    &["migrate"],
    // Metrics and the API.
    &["telemetry"],
    // The loop itself.
    &["daemon"],
];

fn layer(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

/// Every top-level module name: `x.rs` and `x/` under src (the binary's `main`, `cli` and
/// `lib` aside).
fn modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let name = name.strip_suffix(".rs").map_or(name.clone(), str::to_owned);
            (!["lib", "main", "cli"].contains(&name.as_str())).then_some(name)
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<(std::path::PathBuf, String)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((p.clone(), fs::read_to_string(&p).unwrap()));
        }
    }
}

/// The names `crate::` paths reach in `src`, `use crate::{a, b::c}` groups included.
fn arrows(src: &str, mods: &BTreeSet<String>) -> BTreeSet<String> {
    let code = src.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for part in code.split("crate::").skip(1) {
        if let Some(group) = part.strip_prefix('{') {
            let group = group.split("};").next().unwrap_or("");
            // Top-level names of the group: at the start or after a comma at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        out.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(part));
        }
    }
    out.retain(|m| mods.contains(m));
    out
}

/// Top-level module -> the modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy();
        let top = top.strip_suffix(".rs").unwrap_or(&top).to_owned();
        if !mods.contains(&top) {
            continue;
        }
        let mut to = arrows(text, &mods);
        to.remove(&top);
        graph.entry(top).or_default().extend(to);
    }
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    assert!(
        graph.values().any(|t| !t.is_empty()),
        "no arrows found: the parser is broken"
    );
    graph
}

#[test]
fn every_arrow_points_down_the_layers() {
    let graph = graph();
    let unplaced: Vec<&String> = graph.keys().filter(|m| layer(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer (add them to LAYERS): {unplaced:?}"
    );
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(from, to)| to.iter().map(move |t| (from, t)))
        .filter(|(from, to)| layer(to) >= layer(from))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(
        upward.is_empty(),
        "arrows to the same or a higher layer: {upward:?}"
    );
}

#[test]
fn the_modules_import_one_another_without_a_cycle() {
    let graph = graph();
    // Tarjan's strongly connected components.
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, (usize, usize)>,
        stack: Vec<&'a str>,
        next: usize,
        cycles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, (t.next, t.next));
        t.next += 1;
        t.stack.push(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            match t.index.get(w).copied() {
                None => {
                    visit(t, w);
                    let lw = t.index[w].1;
                    t.index.get_mut(v).unwrap().1 = t.index[v].1.min(lw);
                }
                Some((iw, _)) if t.stack.contains(&w) => {
                    t.index.get_mut(v).unwrap().1 = t.index[v].1.min(iw);
                }
                Some(_) => {}
            }
        }
        if t.index[v].0 == t.index[v].1 {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.cycles.push(comp);
            }
        }
    }
    let mut t = T {
        g: &graph,
        index: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    assert!(
        t.cycles.is_empty(),
        "modules that import one another (a cycle): {:?}",
        t.cycles
    );
}

#[test]
fn the_parser_sees_groups_and_paths() {
    let mods: BTreeSet<String> = ["scan", "fabric", "util", "model"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let got = arrows(
        "use crate::{scan::{a, b}, util::clock};\nfn f() { crate::model::x(); }\n\
         #[cfg(test)]\nmod tests { use crate::fabric; }",
        &mods,
    );
    let want: BTreeSet<String> = ["scan", "util", "model"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(got, want);
}
