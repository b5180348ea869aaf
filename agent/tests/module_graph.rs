//! The library's top-level modules import one another without a cycle: each `crate::x`
//! path in a module's (non-test) source is an arrow to `x`, and the graph of arrows must
//! have no strongly connected component larger than one module. A new cycle fails here
//! with the modules in it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

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

#[test]
fn the_modules_import_one_another_without_a_cycle() {
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
