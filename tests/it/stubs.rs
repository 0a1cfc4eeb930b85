//! `luamilter stubs DIR`: the editor stubs of stubs/, byte for byte, and a .luarc.json that
//! names DIR (docs/editor.md).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

fn luamilter_stubs(dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_luamilter"))
        .arg("stubs")
        .arg(dir)
        .output()
        .unwrap()
}

/// Every file under `dir`, by `/`-separated relative path, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy();
                out.insert(relative.replace('\\', "/"), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn stubs_writes_the_shipped_stubs_and_a_luarc_naming_the_directory() {
    let tmp = tempfile::TempDir::new().unwrap();
    let target = tmp.path().join("editor/luamilter");
    let out = luamilter_stubs(&target);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let shipped = files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("stubs"));
    let mut written = files(&target);
    let luarc = written.remove(".luarc.json").expect("a .luarc.json");
    assert!(shipped.contains_key("milter.lua") && shipped.contains_key("milter/dns.lua"));
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        shipped.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &shipped {
        assert!(written[path] == *bytes, "{path} differs from stubs/{path}");
        let full: PathBuf = target.join(path);
        assert!(
            stdout.contains(&full.canonicalize().unwrap().display().to_string()),
            "{stdout}"
        );
    }

    let luarc: serde_json::Value = serde_json::from_slice(&luarc).unwrap();
    let library = target.canonicalize().unwrap().display().to_string();
    assert_eq!(luarc["workspace.library"], serde_json::json!([library]));
    assert_eq!(luarc["runtime.version"], "Lua 5.4");
    assert_eq!(luarc["runtime.builtin"]["io"], "disable");
    assert!(stdout.contains("docs/editor.md"), "{stdout}");

    // Run again over an edited copy: the files are replaced.
    std::fs::write(target.join("milter/dns.lua"), "-- edited\n").unwrap();
    assert!(luamilter_stubs(&target).status.success());
    assert!(files(&target)["milter/dns.lua"] == shipped["milter/dns.lua"]);
}

#[test]
fn stubs_says_why_it_cannot_write() {
    let tmp = tempfile::TempDir::new().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let out = luamilter_stubs(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with(&format!("luamilter stubs: {}: ", file.display())),
        "{stderr}"
    );
}
