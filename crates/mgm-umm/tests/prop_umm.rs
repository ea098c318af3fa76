//! The pool and the feature cache against simple models under random operation sequences: the
//! pool never lends overlapping blocks at once and its statistics equal the model's; the cache
//! returns exactly the data of live handles and detects every overwrite, batch writes across
//! the end included.

use std::collections::HashMap;

use mgm_umm::Error;
use std::alloc::{GlobalAlloc, Layout};

use mgm_umm::pool::CachingAlloc;
use mgm_umm::ring::{FeatureCache, Handle};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum PoolOp {
    Alloc(usize),
    Free(usize),
    Empty,
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        // below the pooled minimum (system) and across several classes
        4 => (1usize..9000).prop_map(PoolOp::Alloc),
        3 => any::<usize>().prop_map(PoolOp::Free),
        1 => Just(PoolOp::Empty),
    ]
}

/// The model's size class: pooled requests round up to a power of two of at least 512 bytes.
fn class_bytes(len: usize) -> Option<usize> {
    (len >= 512).then(|| len.next_power_of_two())
}

proptest! {
    #[test]
    fn pool_lends_each_block_once_and_counts_like_the_model(ops in prop::collection::vec(pool_op(), 1..120)) {
        let pool = CachingAlloc::new();
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        // the model: cached blocks per class, counters
        let mut cached: HashMap<usize, usize> = HashMap::new();
        let (mut allocated, mut reserved, mut peak, mut hits, mut misses) = (0usize, 0usize, 0usize, 0u64, 0u64);
        for (k, op) in ops.into_iter().enumerate() {
            match op {
                PoolOp::Alloc(len) => {
                    let layout = Layout::from_size_align(len, 8).unwrap();
                    // SAFETY: nonzero size; freed below with the same layout
                    let p = unsafe { pool.alloc(layout) };
                    prop_assert!(!p.is_null());
                    // every byte is writable, and no live block shares the storage
                    let tag = k as u8;
                    // SAFETY: `len` bytes were just allocated
                    unsafe { p.write_bytes(tag, len) };
                    if let Some(c) = class_bytes(len) {
                        let n = cached.entry(c).or_insert(0);
                        if *n > 0 { *n -= 1; hits += 1 } else { misses += 1; reserved += c }
                        allocated += c;
                        peak = peak.max(allocated);
                    }
                    live.push((p, layout, tag));
                }
                PoolOp::Free(i) if !live.is_empty() => {
                    let (p, layout, _) = live.swap_remove(i % live.len());
                    if let Some(c) = class_bytes(layout.size()) {
                        *cached.entry(c).or_insert(0) += 1;
                        allocated -= c;
                    }
                    // SAFETY: allocated above with this layout, freed once
                    unsafe { pool.dealloc(p, layout) };
                }
                PoolOp::Free(_) => {}
                PoolOp::Empty => {
                    pool.empty_cache();
                    reserved -= cached.iter().map(|(c, n)| c * n).sum::<usize>();
                    cached.clear();
                }
            }
            let mut ranges: Vec<(usize, usize)> = live.iter().map(|(p, l, _)| (*p as usize, *p as usize + l.size())).collect();
            ranges.sort();
            prop_assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "two live blocks overlap");
            // each live block still holds the one byte written all over it
            for (p, l, tag) in &live {
                // SAFETY: a live block of `l.size()` initialised bytes
                let bytes = unsafe { std::slice::from_raw_parts(*p, l.size()) };
                prop_assert!(bytes.iter().all(|b| b == tag));
            }
            let s = pool.stats();
            prop_assert_eq!((s.allocated, s.reserved, s.peak, s.hits, s.misses), (allocated, reserved, peak, hits, misses));
        }
        for (p, layout, _) in live {
            // SAFETY: as above
            unsafe { pool.dealloc(p, layout) };
        }
        pool.empty_cache();
        prop_assert_eq!(pool.stats().reserved, 0);
    }
}

#[derive(Clone, Debug)]
enum CacheOp {
    Write(usize),
    Read(usize),
}

proptest! {
    #[test]
    fn cache_reads_live_handles_and_detects_every_overwrite(
        cap in 1usize..9, dim in 1usize..5,
        ops in prop::collection::vec(prop_oneof![(1usize..10).prop_map(CacheOp::Write), any::<usize>().prop_map(CacheOp::Read)], 1..80),
    ) {
        let mut cache = FeatureCache::new(cap, dim).unwrap();
        // the model: every handle ever issued with its data, and which slot write is newest
        let mut issued: Vec<(Handle, Vec<f32>)> = Vec::new();
        let mut newest: HashMap<usize, u64> = HashMap::new();
        let mut next_slot = 0usize;
        let mut value = 0f32;
        for op in ops {
            match op {
                CacheOp::Write(k) => {
                    let rows: Vec<f32> = (0..k * dim).map(|_| { value += 1.0; value }).collect();
                    let r = cache.write_batch(&rows);
                    if k > cap {
                        prop_assert!(r.is_err(), "a batch larger than the ring is refused");
                        continue;
                    }
                    let hs = r.unwrap();
                    prop_assert_eq!(hs.len(), k);
                    for (i, h) in hs.iter().enumerate() {
                        prop_assert_eq!(h.slot(), (next_slot + i) % cap, "wraps in order");
                        newest.insert(h.slot(), h.generation());
                        issued.push((*h, rows[i * dim..(i + 1) * dim].to_vec()));
                    }
                    next_slot = (next_slot + k) % cap;
                }
                CacheOp::Read(i) if !issued.is_empty() => {
                    let (h, data) = &issued[i % issued.len()];
                    let live = newest[&h.slot()] == h.generation();
                    match cache.read(*h) {
                        Ok(got) => {
                            prop_assert!(live, "an overwritten handle read data");
                            prop_assert_eq!(got, &data[..]);
                        }
                        Err(Error::Overwritten { slot, wanted, now }) => {
                            prop_assert!(!live);
                            prop_assert_eq!((slot, wanted, now), (h.slot(), h.generation(), newest[&h.slot()]));
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                CacheOp::Read(_) => {}
            }
        }
        // generations are unique across the whole cache
        let mut gens: Vec<u64> = issued.iter().map(|(h, _)| h.generation()).collect();
        let n = gens.len();
        gens.sort();
        gens.dedup();
        prop_assert_eq!(gens.len(), n);
    }
}

#[test]
fn foreign_handles_and_bad_sizes_are_errors() {
    let mut a = FeatureCache::new(2, 2).unwrap();
    let mut b = FeatureCache::new(4, 2).unwrap();
    for _ in 0..3 {
        b.write(&[1.0, 2.0]).unwrap();
    }
    let h = b.write(&[3.0, 4.0]).unwrap(); // slot 3, generation 4
    assert!(matches!(
        a.read(h),
        Err(Error::ForeignHandle {
            slot: 3,
            generation: 4
        })
    ));
    a.write(&[0.0, 0.0]).unwrap();
    let e = a.write(&[1.0, 2.0, 3.0]).unwrap_err().to_string();
    assert!(e.contains("3 floats are not 1..=2 rows of 2"), "{e}");
    assert!(FeatureCache::new(0, 3).is_err());
}
