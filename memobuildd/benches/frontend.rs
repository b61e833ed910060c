//! Parse + lower time of a generated 1,000-instruction, 20-stage Dockerfile.
//!
//! `cargo bench -p memobuildd --bench frontend` prints the median of many runs; the target is
//! at most 5 ms.

use std::hint::black_box;
use std::time::{Duration, Instant};

use memobuildd::frontend;
use memobuildd::plan::{self, PlanOptions};

const STAGES: usize = 20;
const INSTRUCTIONS: usize = 1_000;

/// A deterministic Dockerfile exercising continuations, expansion, heredocs, JSON and flags.
fn dockerfile() -> String {
    let per_stage = INSTRUCTIONS / STAGES;
    let mut text = String::from("# syntax=docker/dockerfile:1\n");
    for stage in 0..STAGES {
        // Each stage after the first builds on the previous one or copies from it.
        if stage % 3 == 1 {
            text.push_str(&format!("FROM s{} AS s{stage}\n", stage - 1));
        } else {
            text.push_str(&format!("FROM alpine:3.{stage} AS s{stage}\n"));
        }
        for i in 1..per_stage {
            let line = match i % 10 {
                0 => format!("ARG V{i}=v{stage}.{i}"),
                1 => format!(
                    "ENV P{i}=/opt/${{V{}:-x}} Q{i}=\"a b\"",
                    i.saturating_sub(1)
                ),
                2 => format!("RUN set -e; \\\n    make -j2 target{i} \\\n    && echo done-{i}"),
                3 => format!("COPY --chown=1:1 --exclude=*.md src/{i}/ lib/{i} /app/{i}/"),
                4 if stage > 0 => format!("COPY --from=s{} /app/{i} /from/{i}", stage - 1),
                4 => format!("ADD https://example.com/{i}.tgz /dl/"),
                5 => format!("WORKDIR /work/$P{}", i - 4),
                6 => format!("LABEL org.example.step{i}=\"${{V{}}}\"", i - 6),
                7 => format!("RUN <<EOF\necho heredoc {i}\nEOF"),
                8 => format!("EXPOSE {}/tcp", 8000 + i),
                _ => format!("CMD [\"/app/bin\", \"--step\", \"{i}\"]"),
            };
            text.push_str(&line);
            text.push('\n');
        }
    }
    text
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let text = dockerfile();
    let opts = PlanOptions::default();
    let df = frontend::parse(&text, "Dockerfile").expect("the generated Dockerfile parses");
    let count: usize = df.stages.iter().map(|s| s.instructions.len() + 1).sum();
    assert_eq!((df.stages.len(), count), (STAGES, INSTRUCTIONS));
    let nodes = plan::lower(&df, &opts)
        .expect("the generated Dockerfile plans")
        .nodes()
        .count();

    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < 50
        || (started.elapsed() < Duration::from_secs(5) && samples.len() < 2_000)
    {
        let t = Instant::now();
        let df = frontend::parse(black_box(&text), "Dockerfile").expect("parses");
        black_box(plan::lower(&df, &opts).expect("plans"));
        samples.push(t.elapsed());
    }
    let runs = samples.len();
    println!(
        "parse + lower, {INSTRUCTIONS} instructions, {STAGES} stages, {nodes} nodes, {} bytes: median {:.3} ms over {runs} runs (target <= 5 ms)",
        text.len(),
        median(samples).as_secs_f64() * 1e3,
    );
}
