//! The layers of the crate, and a test that their dependencies point one
//! way: a module uses only its own layer and the layers below it.
//!
//! ```text
//! api, worker, hooks          SQL functions, background processes, hooks
//!   -> lifecycle, reencrypt, values, secrets   logic (no #[pg_extern])
//!     -> keys                 key cache, grants, usage, master key, integrity
//!       -> catalog            kms.* identity, invalidation, typed row reads
//!         -> pg, errors       SPI, identity switches, datums, settings
//!           -> crypto, core   pure Rust, no pgrx
//! ```

const GLUE: &[&str] = &["pg", "errors", "crypto", "core"];
const KEYS: &[&str] = &["keys", "catalog", "pg", "errors", "crypto", "core"];
const LOGIC: &[&str] = &[
    "lifecycle",
    "protect",
    "reencrypt",
    "values",
    "secrets",
    "keys",
    "catalog",
    "pg",
    "errors",
    "crypto",
    "core",
];
const PROCESSES: &[&str] = &[
    "worker",
    "lifecycle",
    "protect",
    "reencrypt",
    "values",
    "secrets",
    "keys",
    "catalog",
    "pg",
    "errors",
    "crypto",
    "core",
];

/// (file or folder under src/, the crate's top-level modules it may use).
/// `api` may use everything but the processes and hooks.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("crypto", &["crypto"]),
    ("core", &["core"]),
    ("errors.rs", &["errors", "crypto", "core", "pg"]),
    ("pg", GLUE),
    ("catalog", &["catalog", "pg", "errors", "crypto", "core"]),
    ("keys", KEYS),
    ("lifecycle", LOGIC),
    ("reencrypt.rs", LOGIC),
    ("protect", LOGIC),
    ("values.rs", LOGIC),
    ("secrets.rs", LOGIC),
    ("worker", PROCESSES),
    ("hooks", &["hooks", "pg", "errors", "crypto", "core"]),
    (
        "api",
        &[
            "api",
            "lifecycle",
            "protect",
            "reencrypt",
            "values",
            "secrets",
            "keys",
            "catalog",
            "pg",
            "errors",
            "crypto",
            "core",
        ],
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn sources(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).expect("readable src") {
                sources(&e.expect("entry").path(), out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.to_path_buf());
        }
    }

    /// Every `crate::<module>` a code line (not a comment) of `file` names.
    fn uses(file: &Path) -> Vec<(usize, String)> {
        let text = std::fs::read_to_string(file).expect("readable source");
        let krate = concat!("crate", "::");
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (i, _) in code.match_indices(krate) {
                let rest = &code[i + krate.len()..];
                // `crate::{a, b::c}` names each module of the group.
                let group = match rest.strip_prefix('{') {
                    Some(g) => g.split('}').next().unwrap_or(""),
                    None => rest,
                };
                for item in group.split(',') {
                    let m: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    out.push((n + 1, m));
                    if !rest.starts_with('{') {
                        break;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn layers_point_one_way() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut bad = Vec::new();
        let mut checked = 0;
        for (part, allowed) in LAYERS {
            let mut files = Vec::new();
            sources(&src.join(part), &mut files);
            assert!(!files.is_empty(), "src/{part} exists");
            for f in &files {
                checked += 1;
                for (line, m) in uses(f) {
                    if !allowed.contains(&m.as_str()) {
                        bad.push(format!("{}:{line} uses crate::{m}", f.display()));
                    }
                }
            }
        }
        assert!(checked > 40, "checked {checked} files");
        assert!(bad.is_empty(), "a layer reaches up: {bad:#?}");
    }

    /// Every top-level module of src/ is in the table above (so a new one
    /// cannot escape the check).
    #[test]
    fn every_module_has_a_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for e in std::fs::read_dir(&src).expect("readable src") {
            let name = e.expect("entry").file_name().into_string().expect("utf-8");
            if matches!(name.as_str(), "lib.rs" | "layers.rs") {
                continue;
            }
            assert!(
                LAYERS.iter().any(|(p, _)| *p == name),
                "src/{name} has no layer in src/layers.rs"
            );
        }
    }
}
