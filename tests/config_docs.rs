//! The configuration reference cannot silently lose a key: every key the config structs accept must appear in
//! config/default.toml (set, or in a commented example), and every section in README's configuration table,
//! with its keys listed in the row or in the README section the row links to.
//!
//! The structs are read as text from the source file that defines `pub struct WebsocketConfig` (found anywhere
//! under src/), so the test follows that file when it moves. Read: the `pub` fields of every struct marked
//! `deny_unknown_fields` (the ones a config file is deserialized into), with `#[serde(rename = "..")]` honoured
//! and `#[serde(skip)]` fields left out; `Config`'s own fields name the sections.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text of the file defining the config structs.
fn config_source() -> String {
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    files.sort();
    files
        .iter()
        .map(|f| fs::read_to_string(f).expect("read a source file"))
        .find(|text| text.contains("pub struct WebsocketConfig"))
        .expect("some file under src/ defines `pub struct WebsocketConfig`")
}

/// One field: its TOML key and its Rust type.
struct Field {
    key: String,
    ty: String,
}

/// Struct name -> fields, for every struct deserialized with `deny_unknown_fields`.
fn config_structs(source: &str) -> BTreeMap<String, Vec<Field>> {
    let mut structs = BTreeMap::new();
    let lines: Vec<&str> = source.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let Some(rest) = line.strip_prefix("pub struct ") else {
            i += 1;
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The attributes right above the struct (doc comments and derives between them allowed).
        let attributes: String = lines[..i]
            .iter()
            .rev()
            .take_while(|l| {
                let l = l.trim();
                l.starts_with("#[") || l.starts_with("///")
            })
            .copied()
            .collect();
        i += 1;
        if !attributes.contains("deny_unknown_fields") || !rest.trim_end().ends_with('{') {
            continue;
        }
        let mut fields = Vec::new();
        let mut pending = String::new();
        while i < lines.len() && lines[i].trim() != "}" {
            let l = lines[i].trim();
            if l.starts_with("#[") {
                pending.push_str(l);
            } else if let Some(field) = l.strip_prefix("pub ") {
                let (ident, ty) = field.split_once(':').expect("a `pub name: Type,` field");
                let skipped = pending.contains("skip)") || pending.contains("skip,");
                let renamed = pending
                    .split("rename = \"")
                    .nth(1)
                    .and_then(|r| r.split('"').next());
                if !skipped {
                    fields.push(Field {
                        key: renamed.unwrap_or(ident.trim()).to_string(),
                        ty: ty.trim().trim_end_matches(',').to_string(),
                    });
                }
                pending.clear();
            } else if !l.starts_with("///") && !l.is_empty() {
                pending.clear();
            }
            i += 1;
        }
        structs.insert(name, fields);
    }
    structs
}

/// A section of the configuration: how default.toml and README name it, and the keys it accepts.
struct Section {
    /// `server`, `namespaces.<name>`, `sources`.
    name: String,
    /// `[server]`, `[namespaces.<name>]`, `[[sources]]`.
    header: String,
    keys: Vec<String>,
}

fn sections() -> Vec<Section> {
    let structs = config_structs(&config_source());
    let root = structs
        .get("Config")
        .expect("a `pub struct Config` with deny_unknown_fields");
    assert!(root.len() >= 5, "too few sections found in Config");
    let mut out = Vec::new();
    for field in root {
        // The struct named in the field's type: `ServerConfig`, `Vec<SourceConfig>`, `BTreeMap<String, X>`.
        let inner = field
            .ty
            .trim_end_matches('>')
            .rsplit(['<', ' ', ','])
            .next()
            .unwrap_or_default()
            .to_string();
        let keys = structs
            .get(&inner)
            .unwrap_or_else(|| {
                panic!(
                    "Config.{} has type {}: no such config struct",
                    field.key, field.ty
                )
            })
            .iter()
            .map(|f| f.key.clone())
            .collect::<Vec<_>>();
        assert!(!keys.is_empty(), "{inner} has no fields");
        let (name, header) = if field.ty.starts_with("Vec<") {
            (field.key.clone(), format!("[[{}]]", field.key))
        } else if field.ty.contains("Map<") {
            let name = format!("{}.<name>", field.key);
            (name.clone(), format!("[{name}]"))
        } else {
            (field.key.clone(), format!("[{}]", field.key))
        };
        out.push(Section { name, header, keys });
    }
    out
}

/// Section name -> keys that default.toml shows under it, set or commented out (`# key = ...`). A sub-table
/// header (`[sources.fields]`) shows its key (`fields`) too; `[namespaces.chat]` counts as `namespaces.<name>`.
fn default_toml_keys(sections: &[Section]) -> BTreeMap<String, BTreeSet<String>> {
    let text =
        fs::read_to_string(repo().join("config/default.toml")).expect("read config/default.toml");
    let maps: BTreeSet<&str> = sections
        .iter()
        .filter_map(|s| s.name.strip_suffix(".<name>"))
        .collect();
    let mut shown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if line.starts_with('[') {
            let path = line
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim();
            let parts: Vec<&str> = path.split('.').collect();
            let section = if parts.len() >= 2 && maps.contains(parts[0]) {
                format!("{}.<name>", parts[0])
            } else {
                parts[0].to_string()
            };
            let depth = if maps.contains(parts[0]) { 2 } else { 1 };
            if parts.len() > depth {
                // A sub-table of a section: its key belongs to the section, its own keys do not.
                shown
                    .entry(section)
                    .or_default()
                    .insert(parts[depth].to_string());
                current = None;
            } else {
                current = Some(section);
            }
            continue;
        }
        let Some(section) = &current else { continue };
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            {
                shown
                    .entry(section.clone())
                    .or_default()
                    .insert(key.to_string());
            }
        }
    }
    shown
}

#[test]
fn every_config_key_appears_in_default_toml() {
    let sections = sections();
    let shown = default_toml_keys(&sections);
    let mut missing = Vec::new();
    for section in &sections {
        for key in &section.keys {
            if !shown
                .get(&section.name)
                .is_some_and(|keys| keys.contains(key))
            {
                missing.push(format!("{} {key}", section.header));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "config/default.toml shows neither a value nor a commented example for: {}",
        missing.join(", ")
    );
}

/// README's text under the heading whose GitHub anchor is `anchor`, up to the next heading of its level.
fn readme_section<'a>(readme: &'a str, anchor: &str) -> Option<&'a str> {
    let slug = |title: &str| -> String {
        title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    };
    let mut offset = 0;
    for line in readme.split_inclusive('\n') {
        let level = line.chars().take_while(|c| *c == '#').count();
        if level > 0 && slug(line.trim_start_matches('#')) == anchor {
            let body = &readme[offset + line.len()..];
            let end = body
                .match_indices('\n')
                .map(|(i, _)| i + 1)
                .find(|&i| {
                    let hashes = body[i..].chars().take_while(|c| *c == '#').count();
                    hashes > 0 && hashes <= level && body[i..].chars().nth(hashes) == Some(' ')
                })
                .unwrap_or(body.len());
            return Some(&body[..end]);
        }
        offset += line.len();
    }
    None
}

#[test]
fn every_config_section_is_in_the_readme_table_with_its_keys() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let configuration =
        readme_section(&readme, "configuration").expect("README has a `## Configuration` section");
    let mut problems = Vec::new();
    for section in sections() {
        let Some(row) = configuration
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", section.header)))
        else {
            problems.push(format!("no row for `{}`", section.header));
            continue;
        };
        // Keys are listed in the row itself, or in the README sections the row links to.
        let mut text = row.to_string();
        for link in row.split("](#").skip(1) {
            let anchor = link.split(')').next().unwrap_or_default();
            match readme_section(&readme, anchor) {
                Some(body) => text.push_str(body),
                None => problems.push(format!(
                    "`{}` links to #{anchor}, which README lacks",
                    section.header
                )),
            }
        }
        for key in &section.keys {
            if !text.contains(&format!("`{key}`")) && !text.contains(&format!("\n{key} =")) {
                problems.push(format!("`{}` key `{key}`", section.header));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README's configuration table misses: {}",
        problems.join("; ")
    );
}

#[test]
fn the_struct_reader_sees_the_known_sections() {
    // Guards the text reader itself: were it to find nothing, the two checks above would pass vacuously.
    let sections = sections();
    let headers: Vec<&str> = sections.iter().map(|s| s.header.as_str()).collect();
    for expected in [
        "[server]",
        "[websocket]",
        "[namespaces.<name>]",
        "[[sources]]",
        "[[ingest]]",
    ] {
        assert!(
            headers.contains(&expected),
            "{expected} not found in {headers:?}"
        );
    }
    let websocket = sections.iter().find(|s| s.name == "websocket").unwrap();
    assert!(websocket.keys.iter().any(|k| k == "max_message_bytes"));
    assert!(websocket.keys.len() >= 10, "{:?}", websocket.keys);
}
