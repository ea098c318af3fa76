//! The async encode/decode pipeline: image encoding of request N+1 overlaps with decoding of
//! request N. Encoder workers take requests in order from a shared counter and send their
//! results through a bounded channel (a full channel stops them: back-pressure); the calling
//! thread decodes the results strictly in request order, whatever order the encoders finish.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;

use crate::error::{Error, Result};

/// How the pipeline runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Encoder threads (at least 1).
    pub encoders: usize,
    /// Encoded results that may wait for the decoder before the encoders stop (at least 1).
    pub depth: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            encoders: 1,
            depth: 2,
        }
    }
}

/// Runs `encode` on every request on worker threads and `decode` on the calling thread in
/// request order; returns the decoded outputs in order. The first error (of either stage)
/// stops the pipeline and is returned.
pub fn run<R, E, O, FE, FD, Err>(
    requests: Vec<R>,
    opts: PipelineOptions,
    encode: FE,
    mut decode: FD,
) -> std::result::Result<Vec<O>, PipelineError<Err>>
where
    R: Send + Sync,
    E: Send,
    FE: Fn(&R) -> std::result::Result<E, Err> + Sync,
    FD: FnMut(E) -> std::result::Result<O, Err>,
    Err: Send,
{
    check(opts).map_err(PipelineError::Config)?;
    let n = requests.len();
    let next = AtomicUsize::new(0);
    let (tx, rx) = sync_channel::<(usize, std::result::Result<E, Err>)>(opts.depth);
    std::thread::scope(|s| {
        // owned here, so an early return drops it and unblocks encoders waiting to send
        let rx = rx;
        for _ in 0..opts.encoders.min(n.max(1)) {
            let tx = tx.clone();
            let (next, requests, encode) = (&next, &requests, &encode);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    // a closed channel: the decoder stopped on an error
                    if tx.send((i, encode(&requests[i]))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut out = Vec::with_capacity(n);
        let mut waiting = BTreeMap::new();
        for (i, e) in rx.iter() {
            waiting.insert(i, e);
            while let Some(e) = waiting.remove(&out.len()) {
                let encoded = match e {
                    Ok(v) => v,
                    Err(err) => {
                        // stop the encoders: later sends fail, the workers exit
                        next.store(n, Ordering::Relaxed);
                        return Err(PipelineError::Stage(err));
                    }
                };
                match decode(encoded) {
                    Ok(o) => out.push(o),
                    Err(err) => {
                        next.store(n, Ordering::Relaxed);
                        return Err(PipelineError::Stage(err));
                    }
                }
            }
        }
        Ok(out)
    })
}

/// A pipeline failure: bad options, or the first error of a stage.
#[derive(Debug)]
pub enum PipelineError<E> {
    /// The options were unusable.
    Config(Error),
    /// An encode or decode call failed.
    Stage(E),
}

impl<E: std::fmt::Display> std::fmt::Display for PipelineError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PipelineError::Config(e) => write!(f, "{e}"),
            PipelineError::Stage(e) => write!(f, "{e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for PipelineError<E> {}

/// [`run`]'s check of its options (for callers that validate early).
pub fn check(opts: PipelineOptions) -> Result<()> {
    if opts.encoders == 0 || opts.depth == 0 {
        return Err(Error::InvalidInput {
            what: "pipeline::run",
            msg: format!(
                "{} encoders and depth {}: both must be >= 1",
                opts.encoders, opts.depth
            ),
        });
    }
    Ok(())
}
