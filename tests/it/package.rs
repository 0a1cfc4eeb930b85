//! The Debian package that `.ci/deb` builds (its path in `LUAMILTER_DEB`): the file list and
//! control fields, lintian with the agreed overrides (`debian/lintian-overrides`, shipped in the
//! package), and a real `dpkg -i` then `dpkg --purge` inside a throwaway overlay of this
//! machine's root (`unshare` + overlayfs + `chroot`), so the maintainer scripts run for real
//! and the host is not touched. Ignored in a plain `cargo test` (building a release .deb takes
//! minutes); `.ci/deb` runs them.

use std::path::PathBuf;
use std::process::Command;

/// The .deb under test.
fn deb() -> PathBuf {
    let path = std::env::var_os("LUAMILTER_DEB")
        .expect("LUAMILTER_DEB names the .deb to check; .ci/deb builds it and sets it");
    PathBuf::from(path)
}

fn output(command: &mut Command) -> String {
    let out = command.output().expect("run");
    assert!(out.status.success(), "{command:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs the release .deb: run .ci/deb"]
fn file_list_and_control_fields() {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb()));
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let has = |path: &str| files.contains(&path);
    let mut expected = vec![
        "./usr/bin/luamilter".to_string(),
        "./etc/luamilter/luamilter.toml".into(),
        "./usr/lib/systemd/system/luamilter.service".into(),
        "./usr/share/man/man1/luamilter.1.gz".into(),
        "./usr/share/man/man1/luamilter-db-bans-list.1.gz".into(),
        "./usr/share/man/man5/luamilter.toml.5.gz".into(),
        "./usr/share/bash-completion/completions/luamilter".into(),
        "./usr/share/zsh/vendor-completions/_luamilter".into(),
        "./usr/share/fish/vendor_completions.d/luamilter.fish".into(),
        "./usr/share/lintian/overrides/luamilter".into(),
        "./usr/share/doc/luamilter/examples/luamilter.toml".into(),
    ];
    // Every stock policy, as readable sources.
    for (name, _) in luamilter::stock::STOCK {
        expected.push(format!("./usr/share/luamilter/policies/{name}.lua"));
    }
    for path in &expected {
        assert!(has(path), "{path} not in the package:\n{listing}");
    }
    // The binary's mode, the configuration's (readable by the daemon's group only, set by
    // postinst; shipped 0640).
    let mode = |path: &str| {
        let line = listing.lines().find(|l| l.ends_with(path)).unwrap();
        line.split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(mode("./usr/bin/luamilter"), "-rwxr-xr-x");
    assert_eq!(mode("./etc/luamilter/luamilter.toml"), "-rw-r-----");

    let field = |name: &str| output(Command::new("dpkg-deb").arg("-f").arg(deb()).arg(name));
    assert_eq!(field("Package").trim(), "luamilter");
    assert_eq!(field("Section").trim(), "mail");
    assert!(field("Depends").contains("adduser"), "{}", field("Depends"));
    let conffiles = output(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb())
            .arg("conffiles"),
    );
    assert!(
        conffiles.contains("/etc/luamilter/luamilter.toml"),
        "{conffiles}"
    );
    let postinst = output(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb())
            .arg("postinst"),
    );
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
}

#[test]
#[ignore = "needs the release .deb and lintian: run .ci/deb"]
fn lintian_finds_nothing_beyond_the_agreed_overrides() {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
        .arg(deb())
        .output()
        .expect("lintian: tests/setup.sh installs it");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lintian:\n{report}{out:?}");
    assert!(!report.contains("E: "), "{report}");
    assert!(!report.contains("W: "), "{report}");
}

/// Installs the package in an overlay of `/` and runs `checks` (shell) in it after the
/// install; prints `checks`' output, then purges and prints what is left.
const OVERLAY_INSTALL: &str = r#"
set -eu
deb=$1; checks=$2; tmp=$(mktemp -d)
mount -t tmpfs tmpfs "$tmp"
mkdir "$tmp/upper" "$tmp/work" "$tmp/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$tmp/upper,workdir=$tmp/work" "$tmp/root"
root=$tmp/root
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
# A throwaway root: no service may start (Debian's convention for chroots).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$deb" "$root/tmp/luamilter.deb"
chroot "$root" dpkg -i /tmp/luamilter.deb >&2
chroot "$root" sh -c "$checks"
chroot "$root" dpkg --purge luamilter >&2
echo "after purge:"
for p in /usr/bin/luamilter /var/lib/luamilter /etc/luamilter; do
  [ -e "$root$p" ] && echo "left $p" || echo "gone $p"
done
chroot "$root" getent passwd luamilter >/dev/null && echo "user kept"
"#;

#[test]
#[ignore = "needs the release .deb and root: run .ci/deb"]
fn installs_configures_and_purges_in_a_scratch_root() {
    let checks = r#"
        echo "user: $(getent passwd luamilter | cut -d: -f1,6,7)"
        echo "postfix groups: $(id -nG postfix)"
        echo "state: $(stat -c '%U:%G %a' /var/lib/luamilter)"
        echo "config: $(stat -c '%U:%G %a' /etc/luamilter/luamilter.toml)"
        echo "local policies: $(stat -c '%U:%G %a' /etc/luamilter/policies)"
        echo "unit: $(systemctl is-enabled luamilter.service 2>&1)"
        luamilter check --config /etc/luamilter/luamilter.toml | tail -n 1
        MANWIDTH=80 man 5 luamilter.toml | grep -q 'listen = "inet:8894@127.0.0.1"' && echo "man 5 luamilter.toml"
        bash -c '. /usr/share/bash-completion/completions/luamilter; complete -p luamilter'
    "#;
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            OVERLAY_INSTALL,
            "sh",
        ])
        .arg(deb())
        .arg(checks)
        .output()
        .expect("unshare");
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}\n{log}");
    for line in [
        "user: luamilter:/var/lib/luamilter:/usr/sbin/nologin",
        "state: luamilter:luamilter 750",
        "config: root:luamilter 640",
        "local policies: root:luamilter 750",
        "unit: enabled",
        "ok: 3 policies in the chain",
        "man 5 luamilter.toml",
        "-F _luamilter luamilter",
        "gone /usr/bin/luamilter",
        "gone /var/lib/luamilter",
        "gone /etc/luamilter",
        "user kept",
    ] {
        assert!(
            report.contains(line),
            "missing {line:?} in:\n{report}\n{log}"
        );
    }
    let postfix = report.lines().find(|l| l.starts_with("postfix groups:"));
    assert!(
        postfix.is_some_and(|l| l.split_whitespace().any(|g| g == "luamilter")),
        "postfix must be in group luamilter:\n{report}"
    );
}
