//! The bench's command line: where things are, and how many repetitions
//! and requests each phase makes.

use std::path::PathBuf;

use anyhow::{Context, bail};

pub struct Options {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub criterion_dir: PathBuf,
    pub reps: usize,
    pub json_requests: usize,
    pub stream_requests: usize,
    pub store_calls: usize,
    pub counted_requests: usize,
    pub wrk_seconds: u64,
    pub sse_streams: usize,
    /// The bench key's `limit_mode`: `soft` (the default) or `hard` (each
    /// request's worst case tokenized and reserved).
    pub limit_mode: String,
}

const USAGE: &str = "usage: relay-bench [--reps N] [--quick] [--limit-mode soft|hard] [--root DIR] [--bin-dir DIR] [--state-dir DIR] [--criterion-dir DIR]";

impl Options {
    pub fn parse() -> anyhow::Result<Options> {
        let mut options = Options::defaults()?;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--reps" => options.reps = value()?.parse().context("--reps")?,
                "--root" => options.root = PathBuf::from(value()?),
                "--bin-dir" => options.bin_dir = PathBuf::from(value()?),
                "--state-dir" => options.state_dir = PathBuf::from(value()?),
                "--criterion-dir" => options.criterion_dir = PathBuf::from(value()?),
                "--quick" => options.quick(),
                "--limit-mode" => match value()?.as_str() {
                    mode @ ("soft" | "hard") => options.limit_mode = mode.to_owned(),
                    other => bail!("--limit-mode must be soft or hard, not {other}"),
                },
                _ => bail!("unknown argument {arg}\n{USAGE}"),
            }
        }
        if !(1..=20).contains(&options.reps) {
            bail!("--reps must be between 1 and 20");
        }
        Ok(options)
    }

    /// The full run, with paths under the current directory (the repo root
    /// when run by `make bench`).
    fn defaults() -> anyhow::Result<Options> {
        let root = std::env::current_dir()?;
        Ok(Options {
            bin_dir: root.join("target/release"),
            state_dir: root.join(".cache/run-bench"),
            criterion_dir: root.join("target/criterion"),
            root,
            reps: 5,
            json_requests: 400,
            stream_requests: 200,
            store_calls: 100,
            counted_requests: 50,
            wrk_seconds: 6,
            sse_streams: 8,
            limit_mode: "soft".into(),
        })
    }

    /// A smoke run of the whole pipeline: not for figures.
    fn quick(&mut self) {
        self.reps = 1;
        self.json_requests = 40;
        self.stream_requests = 20;
        self.store_calls = 10;
        self.counted_requests = 10;
        self.wrk_seconds = 1;
        self.sse_streams = 2;
    }
}
