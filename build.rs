//! Embeds the stock policy pack (`policies/**/*.lua`) and its message templates
//! (`policies/templates/*.txt`) into the binary, so a bare install has them.

use std::{env, fmt::Write, fs, path::Path};

fn collect(dir: &Path, prefix: &str, suffix: &str, out: &mut Vec<(String, String)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            collect(&path, &format!("{prefix}{name}/"), suffix, out);
        } else if let Some(stem) = name.strip_suffix(suffix) {
            out.push((
                format!("{prefix}{stem}"),
                path.canonicalize().unwrap().display().to_string(),
            ));
        }
    }
}

/// `pub const NAME: &[(&str, &str)]` of (name, contents) for `files`, documented by `doc`.
fn table(code: &mut String, doc: &str, name: &str, files: &[(String, String)]) {
    writeln!(code, "/// {doc}\npub const {name}: &[(&str, &str)] = &[").unwrap();
    for (name, path) in files {
        println!("cargo:rerun-if-changed={path}");
        writeln!(code, "    ({name:?}, include_str!({path:?})),").unwrap();
    }
    code.push_str("];\n");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    println!("cargo:rerun-if-changed=policies");
    let mut policies = Vec::new();
    collect(&root, "", ".lua", &mut policies);
    let mut templates = Vec::new();
    collect(&root.join("templates"), "", ".txt", &mut templates);
    let mut code = String::new();
    table(
        &mut code,
        "The stock pack: (name relative to `policies/` without `.lua`, source).",
        "STOCK",
        &policies,
    );
    table(
        &mut code,
        "The stock templates: (name relative to `policies/templates/` without `.txt`, text).",
        "STOCK_TEMPLATES",
        &templates,
    );
    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("stock.rs"),
        code,
    )
    .unwrap();
}
