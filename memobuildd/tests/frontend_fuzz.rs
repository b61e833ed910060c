//! The frontend and planner never panic, whatever the text.
//!
//! A deterministic xorshift generator feeds them arbitrary bytes and mutations of real
//! Dockerfiles (BuildKit's conformance files plus a few with heredocs, stages and ARGs): byte
//! flips, insertions of syntax-laden tokens, deletions and line splices. By default it runs for
//! about two seconds per corpus; `MEMOBUILD_FUZZ_SECS=600` runs each for that long instead, and
//! `MEMOBUILD_FUZZ_SEED` picks another seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};
use std::{env, fs};

use memobuildd::frontend::{self, shell};
use memobuildd::plan::{self, PlanOptions};

mod common;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fragments that steer mutations into the parser's interesting corners.
const TOKENS: &[&str] = &[
    "\\",
    "\\\n",
    "<<EOF",
    "<<-'EOF'",
    "\nEOF\n",
    "[",
    "]",
    "\"",
    "'",
    "$",
    "${",
    "}",
    ":-",
    ":?",
    "--",
    "--from=0 ",
    "--mount=type=cache,target=/x ",
    "=",
    "#",
    "\n",
    "\t",
    " ",
    "`",
    "# escape=`\n",
    "FROM a AS b\n",
    "COPY --from=b / /\n",
    "ARG A=1\n",
    "ONBUILD ",
    "{",
    "HEALTHCHECK ",
    "\u{feff}",
    "\r\n",
    "é",
    "\u{a0}",
];

const SEEDS: &[&str] = &[
    "# syntax=docker/dockerfile:1\nARG BASE=alpine\nFROM $BASE AS build\nARG V=1\nENV P=/app V=$V\nWORKDIR $P\nCOPY --chown=1:1 --exclude=*.md src/ ./\nRUN --mount=type=cache,target=/root/.cache <<EOF cat - >x\nmake ${V}\nEOF\nFROM scratch\nCOPY --from=build /app /app\nEXPOSE 80/tcp\nHEALTHCHECK --interval=5s CMD [\"/app\"]\nCMD [\"/app\"]\n",
    "FROM a\nCOPY <<-A <<\"B\" /dst/\n\tone\n\tA\ntwo $X\nB\nONBUILD RUN echo hi\nLABEL a=b \\\n  c=\"d e\"\nSHELL [\"/bin/sh\", \"-c\"]\n",
];

fn budget() -> Duration {
    let secs = env::var("MEMOBUILD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok());
    Duration::from_secs_f64(secs.unwrap_or(2.0))
}

fn seed() -> u64 {
    env::var("MEMOBUILD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// Every Dockerfile of the conformance data (when it is here), plus [`SEEDS`].
fn corpus() -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    let Some(root) = common::data_root("frontend_fuzz corpus") else {
        files.extend(SEEDS.iter().map(|s| s.as_bytes().to_vec()));
        return files;
    };
    let mut dirs = vec![root.join("dockerfile-parser")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("conformance data") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "Dockerfile") {
                files.push(fs::read(&path).expect("readable"));
            }
        }
    }
    assert!(files.len() >= 38, "conformance Dockerfiles missing");
    files.extend(SEEDS.iter().map(|s| s.as_bytes().to_vec()));
    files
}

/// Runs every entry point on `bytes`; a panic propagates.
fn exercise(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = frontend::dump(&text);
    let _ = shell::expand(&text, &[("A", "a b"), ("EMPTY", "")][..], '\\');
    let Ok(df) = frontend::parse(&text, "Dockerfile") else {
        return;
    };
    let mut targets: Vec<Option<String>> = df.stages.iter().map(|s| s.name.clone()).collect();
    targets.push(None);
    for target in targets {
        let opts = PlanOptions {
            target,
            build_args: vec![("A".to_owned(), "x".to_owned())],
        };
        if let Ok(graph) = plan::lower(&df, &opts) {
            for index in graph.toposort() {
                let _ = graph.node(index).label.len();
            }
        }
    }
}

fn mutate(rng: &mut XorShift, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                bytes.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            3 => {
                // Splice in a line of another file.
                let other = &corpus[rng.below(corpus.len())];
                let lines: Vec<&[u8]> = other.split_inclusive(|&b| b == b'\n').collect();
                if let Some(line) = lines.get(rng.below(lines.len())) {
                    bytes.splice(at..at, line.iter().copied());
                }
            }
            _ => {
                let len = rng.below(8);
                bytes.splice(at..at, (0..len).map(|_| rng.next() as u8));
            }
        }
    }
    bytes
}

/// Runs `generate` until the budget is spent; returns how many inputs ran.
fn run(name: &str, mut generate: impl FnMut(&mut XorShift) -> Vec<u8>) -> u64 {
    let mut rng = XorShift(seed());
    let deadline = Instant::now() + budget();
    let mut count = 0u64;
    let mut panics = Vec::new();
    while Instant::now() < deadline {
        let input = generate(&mut rng);
        count += 1;
        if catch_unwind(AssertUnwindSafe(|| exercise(&input))).is_err() {
            panics.push(String::from_utf8_lossy(&input).into_owned());
        }
    }
    eprintln!("{name}: {count} inputs, {} panics", panics.len());
    assert!(
        panics.is_empty(),
        "{name}: {} inputs panicked, first: {:?}",
        panics.len(),
        panics[0]
    );
    count
}

#[test]
fn arbitrary_bytes_never_panic() {
    run("arbitrary bytes", |rng| {
        let len = rng.below(512);
        (0..len).map(|_| rng.next() as u8).collect()
    });
}

#[test]
fn mutated_dockerfiles_never_panic() {
    let corpus = corpus();
    run("mutated Dockerfiles", |rng| mutate(rng, &corpus));
}
