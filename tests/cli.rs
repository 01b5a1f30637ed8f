//! The command line as users meet it: exit codes and messages.

use std::process::Command;

fn p3proxy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_p3proxy"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_accepts_a_shipped_config() {
    let (code, stdout, _) = p3proxy(&["check", "configs/worker-host.toml"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), "configs/worker-host.toml: ok");
}

#[test]
fn check_refuses_a_bad_config_with_exit_code_2_and_the_field() {
    let (code, _, stderr) = p3proxy(&["check", "configs/invalid/both-exemptions.toml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid `exempt`: set `mark` or `uid`, not both"),
        "{stderr}"
    );
    let (code, _, stderr) = p3proxy(&["check", "configs/nosuch.toml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read configs/nosuch.toml"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_bad_flags_before_binding_anything() {
    let (code, _, stderr) = p3proxy(&[
        "run",
        "--listen",
        "127.0.0.1:15301",
        "--tunnel",
        "127.0.0.1:15301",
        "--metrics",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid `tunnel`: must differ from `listen`"),
        "{stderr}"
    );
    let (code, _, _) = p3proxy(&["run", "--listen", "not-an-address"]);
    assert_eq!(code, 2, "clap refuses it");
}

#[test]
fn run_fails_with_exit_code_1_when_a_listener_cannot_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = p3proxy(&[
        "run",
        "--listen",
        &addr,
        "--upstream",
        "127.0.0.1:1",
        "--metrics",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("binding listeners"), "{stderr}");
}

#[test]
fn a_damaged_journal_stops_the_proxy_at_start_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("p3proxy-cli-journal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let journal = dir.join("journal.jsonl");
    std::fs::write(
        &journal,
        "{\"record\":\"scheduler_port\",\"port\":9091}\nnot json\n",
    )
    .unwrap();
    let (code, _, stderr) = p3proxy(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--tunnel",
        "127.0.0.2:0",
        "--metrics",
        "127.0.0.1:0",
        "--journal",
        journal.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1);
    assert!(
        stderr.contains("journal.jsonl: journal line 2: expected ident")
            && stderr.contains("move the file away to start afresh"),
        "{stderr}"
    );
}

#[test]
fn version() {
    let (code, stdout, _) = p3proxy(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        concat!("p3proxy ", env!("CARGO_PKG_VERSION"))
    );
}
