//! Dynamic batching: batches built to a token budget, each from one modality, of samples of
//! similar length (LLaVA's `group_by_modality_length`, with a budget instead of a fixed size).
//!
//! Per epoch: the samples of each modality are shuffled (seeded), cut into mega-batches of
//! `mega` samples, each mega-batch sorted by length (longest first) and packed greedily into
//! batches whose padded size (batch size x longest sample) stays within the budget; then the
//! order of all batches is shuffled. A sample longer than the budget is an error.

use crate::{Error, Result};

/// One sample's modality tag (e.g. 0 text-only, 1 image) and length in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleInfo {
    /// The modality group it batches with.
    pub modality: u32,
    /// Its length in tokens.
    pub len: usize,
}

/// A small seeded generator (SplitMix64) for the shuffles: reproducible from the seed alone.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn shuffle<T>(v: &mut [T], state: &mut u64) {
    for i in (1..v.len()).rev() {
        let j = (splitmix(state) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The batches (indices into `samples`) of one epoch.
pub fn token_budget_batches(
    samples: &[SampleInfo],
    budget: usize,
    mega: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if let Some((i, s)) = samples.iter().enumerate().find(|(_, s)| s.len > budget) {
        return Err(Error::Input(format!(
            "sample {i} has {} tokens, more than the batch budget of {budget}",
            s.len
        )));
    }
    let mut state = seed;
    let mut modalities: Vec<u32> = samples.iter().map(|s| s.modality).collect();
    modalities.sort_unstable();
    modalities.dedup();
    let mut batches = Vec::new();
    for m in modalities {
        let mut idx: Vec<usize> = (0..samples.len())
            .filter(|&i| samples[i].modality == m)
            .collect();
        shuffle(&mut idx, &mut state);
        for chunk in idx.chunks_mut(mega.max(1)) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(samples[i].len));
            let mut cur: Vec<usize> = Vec::new();
            let mut longest = 0;
            for &i in chunk.iter() {
                let l = samples[i].len.max(1);
                let m2 = longest.max(l);
                if !cur.is_empty() && m2 * (cur.len() + 1) > budget {
                    batches.push(std::mem::take(&mut cur));
                    longest = 0;
                }
                longest = longest.max(l);
                cur.push(i);
            }
            if !cur.is_empty() {
                batches.push(cur);
            }
        }
    }
    shuffle(&mut batches, &mut state);
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_once_within_budget_one_modality_per_batch() {
        let mut st = 7u64;
        let samples: Vec<SampleInfo> = (0..500)
            .map(|_| SampleInfo {
                modality: (splitmix(&mut st) % 3) as u32,
                len: 1 + (splitmix(&mut st) % 200) as usize,
            })
            .collect();
        let b = token_budget_batches(&samples, 512, 64, 1).unwrap();
        let mut seen = vec![0; samples.len()];
        for batch in &b {
            let m = samples[batch[0]].modality;
            let longest = batch.iter().map(|&i| samples[i].len).max().unwrap();
            assert!(longest * batch.len() <= 512, "padded size within budget");
            assert!(batch.iter().all(|&i| samples[i].modality == m));
            for &i in batch {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "every sample exactly once");
        // grouping by length packs far tighter than a random order would
        let padded: usize = b
            .iter()
            .map(|x| x.len() * x.iter().map(|&i| samples[i].len).max().unwrap())
            .sum();
        let real: usize = samples.iter().map(|s| s.len).sum();
        assert!((padded as f64) < 1.3 * real as f64, "{padded} vs {real}");
        assert_eq!(b, token_budget_batches(&samples, 512, 64, 1).unwrap());
        assert_ne!(b, token_budget_batches(&samples, 512, 64, 2).unwrap());
        let long = [SampleInfo {
            modality: 0,
            len: 600,
        }];
        let e = token_budget_batches(&long, 512, 64, 1).unwrap_err();
        assert!(e.to_string().contains("600 tokens"), "{e}");
    }
}
