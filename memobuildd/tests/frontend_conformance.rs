//! BuildKit's own parser and shell-expansion test data, read in place (never copied into this
//! repository) from `$MEMOBUILD_CONFORMANCE_DIR`, else from `../shared/conformance` beside the
//! repository. Every case runs; none is skipped. Without the data (a bare clone) each test
//! says so loudly and passes, except in CI (`CI=true`), where the data must be there.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use memobuildd::frontend::{self, shell};

mod common;
use common::data_root;

/// The case directories under `rel`, sorted by name.
fn cases(root: &Path, rel: &str) -> Vec<PathBuf> {
    let dir = root.join(rel);
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn positive_parser_cases_dump_byte_for_byte() {
    let Some(root) = data_root("positive_parser_cases_dump_byte_for_byte") else {
        return;
    };
    let cases = cases(&root, "dockerfile-parser/testfiles");
    assert_eq!(cases.len(), 33, "expected 33 positive cases");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy();
        let expected = read(&case.join("result"));
        match frontend::dump(&read(&case.join("Dockerfile"))) {
            Ok(dump) if dump.clone() + "\n" == expected => {}
            Ok(dump) => failures.push(format!("{name}:\n--- got\n{dump}\n--- want\n{expected}")),
            Err(e) => failures.push(format!("{name}: failed to parse:\n{e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn negative_parser_cases_fail() {
    let Some(root) = data_root("negative_parser_cases_fail") else {
        return;
    };
    let cases = cases(&root, "dockerfile-parser/testfiles-negative");
    assert_eq!(cases.len(), 4, "expected 4 negative cases");
    for case in &cases {
        let text = read(&case.join("Dockerfile"));
        // `env_no_value` fails in the raw parse already, as upstream; so must the typed parse.
        assert!(
            frontend::dump(&text).is_err(),
            "{} should not dump",
            case.display()
        );
        assert!(
            frontend::parse(&text, "Dockerfile").is_err(),
            "{} should not parse",
            case.display()
        );
    }
}

#[test]
fn line_ranges_cover_continuations() {
    let Some(root) = data_root("line_ranges_cover_continuations") else {
        return;
    };
    let text = read(&root.join("dockerfile-parser/testfile-line/Dockerfile"));
    assert_eq!(
        frontend::line_ranges(&text).unwrap(),
        [(5, 5), (11, 12), (17, 31)]
    );
    let df = frontend::parse(&text, "Dockerfile").unwrap();
    let stage = &df.stages[0];
    assert_eq!((stage.span.start_line, stage.span.end_line), (5, 5));
    let spans: Vec<_> = stage
        .instructions
        .iter()
        .map(|i| (i.span.start_line, i.span.end_line))
        .collect();
    assert_eq!(spans, [(11, 12), (17, 31)]);
}

#[test]
fn env_var_table() {
    let Some(root) = data_root("env_var_table") else {
        return;
    };
    let env: Vec<(&str, &str)> = vec![
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ];
    let text = read(&root.join("shell-expansion/envVarTest"));
    let mut failures = Vec::new();
    let mut run = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        let [platform, input, expected] = fields[..] else {
            panic!("envVarTest:{}: not three fields: {line:?}", n + 1)
        };
        // `W` lines hold for Windows only, where variable names ignore case.
        if platform == "W" {
            continue;
        }
        run += 1;
        let got = shell::expand(input, &env[..], '\\').map(|e| e.word);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(word), expected) => word == expected && expected != "error",
            (Err(_), _) => false,
        };
        if !ok {
            failures.push(format!(
                "envVarTest:{}: {input:?} gave {got:?}, want {expected:?}",
                n + 1
            ));
        }
    }
    assert_eq!(run, 228, "expected 226 A and 2 U lines");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn words_table() {
    let Some(root) = data_root("words_table") else {
        return;
    };
    let text = read(&root.join("shell-expansion/wordsTest"));
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut run = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(assignment) = line.strip_prefix("ENV ") {
            let (name, value) = assignment
                .trim_start()
                .split_once('=')
                .expect("ENV name=value");
            env.insert(name.to_owned(), value.to_owned());
            continue;
        }
        let (input, expected) = line.split_once('|').expect("input|expected");
        let (input, expected) = (input.trim(), expected.trim_start());
        run += 1;
        let got = shell::expand(input, &env, '\\').map(|e| e.words);
        let ok = match &got {
            Err(_) => expected == "error",
            Ok(words) => expected != "error" && *words == expected.split(',').collect::<Vec<_>>(),
        };
        if !ok {
            failures.push(format!(
                "wordsTest:{}: {input:?} gave {got:?}, want {expected:?}",
                n + 1
            ));
        }
    }
    assert_eq!(run, 24, "wordsTest should hold 24 cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
