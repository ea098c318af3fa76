//! Shared helpers of the mgm-rs benches: interleaved timing of ours against peers, and the
//! `case | mgm X | peer Y | R.RRx` table that every bench prints (and saves under
//! `target/reports/`).
//!
//! ```
//! let t = mgm_benches::interleaved(3, &mut [&mut || 1 + 1, &mut || 2 + 0]);
//! assert!(t[0].best > 0.0 && t[1].best <= t[1].median);
//! let row = mgm_benches::Row::new("add 1", "ns", 1.0 / t[0].best, 1.0 / t[1].best, "noop");
//! assert!(row.line().contains("| noop "));
//! ```
#![allow(clippy::print_stdout)] // benches report on stdout

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// Best and median wall time of one side of an interleaved measurement, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// The fastest round: the least noisy estimate on a shared machine.
    pub best: f64,
    /// The median round.
    pub median: f64,
}

/// Times every side once per round, alternating sides within each round, for `rounds` rounds
/// after one untimed warm-up call of each, and returns the best and median time of each side
/// in the order given. Alternating keeps turbo and thermal drift (and a neighbour's load) from
/// favouring one side.
pub fn interleaved<R>(rounds: usize, sides: &mut [&mut dyn FnMut() -> R]) -> Vec<Timing> {
    for side in sides.iter_mut() {
        black_box(side());
    }
    let mut times = vec![Vec::with_capacity(rounds); sides.len()];
    for _ in 0..rounds.max(1) {
        for (side, t) in sides.iter_mut().zip(&mut times) {
            let start = Instant::now();
            black_box(side());
            t.push(start.elapsed().as_secs_f64());
        }
    }
    times.into_iter().map(summarise).collect()
}

/// Best and median of a list of times (seconds).
fn summarise(mut t: Vec<f64>) -> Timing {
    t.sort_by(f64::total_cmp);
    Timing {
        best: t[0],
        median: t[t.len() / 2],
    }
}

/// A peer written in Python (PyTorch) that serves timed runs: spawned with `--serve`, it
/// warms up, prints one JSON line with `"ready"`, then answers each `run` line on stdin with
/// `{"ms": ...}`, the time of one pass measured inside the peer. Keeping it alive lets a bench
/// alternate our rounds with the peer's in one run, so drift of a shared machine hits both.
pub struct PythonPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The ready line's fields (versions, settings).
    pub info: serde_json::Value,
}

impl PythonPeer {
    /// Starts `script` (relative to the workspace root) with `args` and `--serve` under the
    /// reference venv's Python (`cargo xtask reference` creates it); waits for ready.
    pub fn spawn(script: &str, args: &[&str]) -> PythonPeer {
        let py = workspace_root().join("target/reference-venv/bin/python");
        assert!(
            py.exists(),
            "the PyTorch peer needs {} (run `cargo xtask reference` once)",
            py.display()
        );
        let mut cmd = Command::new(&py);
        cmd.arg(workspace_root().join(script)).args(args);
        Self::serve(cmd, script)
    }

    /// Starts `cmd` with `--serve` appended (any program speaking the protocol: a ready JSON
    /// line, then one JSON line per `run`) and waits for ready; `what` names it in errors.
    pub fn serve(mut cmd: Command, what: &str) -> PythonPeer {
        let script = what;
        let mut child = cmd
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut peer = PythonPeer {
            child,
            stdin,
            stdout,
            info: serde_json::Value::Null,
        };
        let ready = peer.read_line();
        assert!(
            ready["ready"] == true,
            "{script} did not get ready: {ready}"
        );
        peer.info = ready;
        peer
    }

    fn read_line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read from the peer");
        assert!(n > 0, "the peer exited (see its stderr above)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("peer line {line:?}: {e}"))
    }

    /// One `run` request; the peer's whole answer.
    pub fn request(&mut self) -> serde_json::Value {
        writeln!(self.stdin, "run").expect("write to the peer");
        self.stdin.flush().expect("flush to the peer");
        self.read_line()
    }

    /// One timed pass of the peer, in seconds.
    pub fn run(&mut self) -> f64 {
        let v = self.request();
        v["ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("peer answered {v}"))
            / 1e3
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// How long each side idles before its timed call: PyTorch's OpenMP workers keep spinning for
/// up to 200 ms after a parallel region (KMP_BLOCKTIME), which would otherwise steal the cores
/// from the round that follows (and rayon's workers do the same, more briefly).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(400);

/// Alternates one timed call of `ours` with one timed pass of `peer` for `rounds` rounds
/// (after one untimed call of ours; the peer warmed up before it was ready), each after a
/// short idle pause, and returns (ours, peer).
pub fn interleaved_with_peer<R>(
    rounds: usize,
    ours: &mut dyn FnMut() -> R,
    peer: &mut PythonPeer,
) -> (Timing, Timing) {
    black_box(ours());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        std::thread::sleep(SETTLE);
        let start = Instant::now();
        black_box(ours());
        a.push(start.elapsed().as_secs_f64());
        std::thread::sleep(SETTLE);
        b.push(peer.run());
    }
    (summarise(a), summarise(b))
}

/// One line of a bench table: a rate (higher is better) for ours and for the peer.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured, e.g. `matmul f32 1024`.
    pub case: String,
    /// Unit of the rates, e.g. `GFLOP/s`.
    pub unit: String,
    /// Our rate.
    pub ours: f64,
    /// The peer's rate.
    pub peer: f64,
    /// Who the peer is, e.g. `gemm f32`.
    pub peer_name: String,
    /// Our rate from the median round, if measured (saved to JSON, not printed).
    pub ours_median: Option<f64>,
    /// The peer's rate from the median round, if measured (saved to JSON, not printed).
    pub peer_median: Option<f64>,
}

impl Row {
    /// A row from two rates.
    pub fn new(case: &str, unit: &str, ours: f64, peer: f64, peer_name: &str) -> Row {
        Row {
            case: case.into(),
            unit: unit.into(),
            ours,
            peer,
            peer_name: peer_name.into(),
            ours_median: None,
            peer_median: None,
        }
    }

    /// A row of rates `work / time` from the best rounds of two timings (medians kept for the
    /// JSON report); `scale` converts to the unit, e.g. `1e-9` for GFLOP/s from FLOPs.
    pub fn from_timings(
        case: &str,
        unit: &str,
        work: f64,
        scale: f64,
        ours: Timing,
        peer: Timing,
        peer_name: &str,
    ) -> Row {
        let rate = |s: f64| work / s * scale;
        Row {
            ours_median: Some(rate(ours.median)),
            peer_median: Some(rate(peer.median)),
            ..Row::new(case, unit, rate(ours.best), rate(peer.best), peer_name)
        }
    }

    /// ours / peer (above 1 means we are faster).
    pub fn ratio(&self) -> f64 {
        self.ours / self.peer
    }

    /// `case | mgm X unit | peer Y unit | R.RRx`.
    pub fn line(&self) -> String {
        format!(
            "{} | mgm {:.1} {} | {} {:.1} {} | {:.2}x",
            self.case,
            self.ours,
            self.unit,
            self.peer_name,
            self.peer,
            self.unit,
            self.ratio()
        )
    }
}

/// Prints the rows and writes them to `target/reports/bench_<name>.json` under the workspace
/// root. `method` says how the numbers were taken and heads the table.
pub fn report(name: &str, method: &str, rows: &[Row]) {
    println!("\n{name}: {method}");
    for r in rows {
        println!("{}", r.line());
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "case": r.case, "unit": r.unit, "mgm": r.ours, "peer": r.peer,
                "peer_name": r.peer_name, "ratio": r.ratio(),
                "mgm_median": r.ours_median, "peer_median": r.peer_median,
            })
        })
        .collect();
    let report = serde_json::json!({
        "bench": name,
        "method": method,
        "threads": rayon::current_num_threads(),
        "rows": json,
    });
    let dir = workspace_root().join("target/reports");
    let path = dir.join(format!("bench_{name}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|_| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&report).expect("plain values serialise"),
        )
    });
    match written {
        Ok(()) => println!("(rows saved to {})\n", path.display()),
        Err(e) => eprintln!("could not write {}: {e}\n", path.display()),
    }
}

/// True when only the peer table is wanted (`MGM_BENCH_TABLE_ONLY=1`), not criterion's groups.
pub fn table_only() -> bool {
    std::env::var_os("MGM_BENCH_TABLE_ONLY").is_some_and(|v| v != "0")
}

/// True under `cargo bench` (cargo passes `--bench`), false under `cargo test --benches` or
/// `--all-targets` and for `--list`/`--test`: the peer table is a measurement that takes
/// minutes, so it runs only when benchmarking, like criterion's own groups.
pub fn benchmarking() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    has("--bench") && !has("--test") && !has("--list")
}

/// The workspace root (one level above benches/).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ is one level below the workspace root")
        .to_path_buf()
}

/// A bench's `main`: the peer table when benchmarking, then the criterion groups `groups`
/// (what `criterion_group!` defines) unless only the table was asked for.
pub fn table_then_criterion(table: fn(), groups: fn()) {
    if benchmarking() {
        table();
    }
    if !table_only() {
        groups();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
    }
}

/// The peak resident set of this process (`VmHWM` in /proc/self/status), in MB; NaN where
/// the file is not there.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The index of the largest value (the first on ties), as a token id.
pub fn argmax(v: &[f32]) -> i64 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &x)| if x > a.1 { (i, x) } else { a },
        )
        .0 as i64
}

/// `n` prompt ids in `lo..vocab` from the 64-bit LCG the Python peers share:
/// x0 = 0x2545F491, x' = x * 6364136223846793005 + 1442695040888963407, id = lo + (x' >> 33)
/// mod (vocab - lo).
pub fn lcg_ids(n: usize, lo: u64, vocab: u64) -> Vec<i64> {
    let mut x: u64 = 0x2545F491;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (lo + (x >> 33) % (vocab - lo)) as i64
        })
        .collect()
}
