//! The layer guard (scripts/check-layers.py) on small fixture trees (tests/fixtures/layers): it must find the
//! cycles planted there, print each as `a -> b -> a`, and pass a layered tree whose only cyclic imports are ones
//! it documents as ignored (test modules, comments, strings).

use std::path::Path;
use std::process::{Command, Output};

fn check_layers(fixture: &str) -> Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("python3")
        .arg(repo.join("scripts/check-layers.py"))
        .arg("--root")
        .arg(repo.join("tests/fixtures/layers").join(fixture))
        .output()
        .expect("python3 runs (the layer guard needs it)")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_cycle_fails_and_is_printed_as_a_path() {
    let output = check_layers("cycle");
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    // Across top-level modules; the last step comes from an inline module's `super::super::`.
    assert!(text.contains("\n  a -> b -> c -> a\n"), "{text}");
    // A folder module and its child importing each other.
    assert!(text.contains("\n  d -> d::e -> d\n"), "{text}");
    assert!(text.contains("2 import cycle(s)"), "{text}");
    // Each step names the file and line of the import.
    assert!(text.contains("c.rs:2: use super::super::a::A;"), "{text}");
}

#[test]
fn a_layered_tree_passes_and_prints_its_layer_order() {
    let output = check_layers("acyclic");
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let order: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with("layer order"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(order, ["core", "engine", "node"], "{text}");
    // node/session.rs reaches core through `super::super::`; node/mod.rs reaches its child by a bare path.
    assert!(
        text.contains("node             uses: core, engine"),
        "{text}"
    );
    // engine/tests.rs is test-only: not a node. The 8 imports include node -> node::session (`use session::..`).
    assert!(
        text.contains("no cycles among 6 module files (8 imports between them)"),
        "{text}"
    );
}

#[test]
fn a_missing_root_is_a_usage_error() {
    let output = check_layers("no-such-tree");
    assert_eq!(output.status.code(), Some(2));
}
