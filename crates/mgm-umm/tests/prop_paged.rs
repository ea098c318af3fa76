//! The paged KV bookkeeping against a model of token contents: after any sequence of adds,
//! appends, forks and frees, reading every live sequence through its block table from a
//! simulated block store (copies done as `Slot::copy` asks) gives exactly its tokens; no block is
//! free and held at once; without forks the blocks used are exactly the sum of ceil(len / block
//! size), never batch x max length.

use std::collections::{HashMap, HashSet};

use mgm_umm::paged::PagedKv;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Add,
    Append(usize, usize),
    Fork(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Add),
        6 => (any::<usize>(), 1usize..12).prop_map(|(s, n)| Op::Append(s, n)),
        1 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Free),
    ]
}

fn run(ops: &[Op], blocks: usize, bs: usize, forks: bool) -> Result<(), TestCaseError> {
    let mut kv = PagedKv::new(blocks, bs).unwrap();
    let mut store: HashMap<(usize, usize), u64> = HashMap::new();
    let mut model: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut ids: Vec<usize> = Vec::new();
    let mut tok = 0u64;
    for o in ops {
        match *o {
            Op::Add => {
                let id = kv.add_sequence();
                model.insert(id, Vec::new());
                ids.push(id);
            }
            Op::Append(s, n) if !ids.is_empty() => {
                let id = ids[s % ids.len()];
                for _ in 0..n {
                    let before = (kv.free_blocks(), kv.block_table(id).unwrap().to_vec());
                    match kv.append(id) {
                        Ok(slot) => {
                            if let Some((from, to)) = slot.copy {
                                for off in 0..slot.offset {
                                    let v = store[&(from, off)];
                                    store.insert((to, off), v);
                                }
                            }
                            tok += 1;
                            store.insert((slot.block, slot.offset), tok);
                            model.get_mut(&id).unwrap().push(tok);
                        }
                        Err(e) => {
                            prop_assert!(e.to_string().contains("out of blocks"), "{e}");
                            prop_assert_eq!(kv.free_blocks(), 0);
                            prop_assert_eq!(
                                (kv.free_blocks(), kv.block_table(id).unwrap().to_vec()),
                                before
                            );
                            break;
                        }
                    }
                }
            }
            Op::Fork(s) if forks && !ids.is_empty() => {
                let src = ids[s % ids.len()];
                let id = kv.fork(src).unwrap();
                let copy = model[&src].clone();
                model.insert(id, copy);
                ids.push(id);
            }
            Op::Free(s) if !ids.is_empty() => {
                let id = ids.swap_remove(s % ids.len());
                kv.free_sequence(id).unwrap();
                model.remove(&id);
                prop_assert!(kv.len(id).is_err(), "a freed sequence is gone");
            }
            _ => {}
        }
        // contents through the block tables
        let mut held = HashSet::new();
        for &id in &ids {
            let table = kv.block_table(id).unwrap();
            prop_assert_eq!(kv.len(id).unwrap(), model[&id].len());
            prop_assert_eq!(table.len(), model[&id].len().div_ceil(bs));
            for (i, &want) in model[&id].iter().enumerate() {
                prop_assert_eq!(
                    store[&(table[i / bs], i % bs)],
                    want,
                    "seq {} token {}",
                    id,
                    i
                );
            }
            held.extend(table.iter().copied());
        }
        prop_assert_eq!(
            held.len(),
            kv.used_blocks(),
            "used blocks are exactly the held ones"
        );
        if !forks {
            let need: usize = ids.iter().map(|id| model[id].len().div_ceil(bs)).sum();
            prop_assert_eq!(kv.used_blocks(), need);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn paged_tables_read_back_every_token_with_forks(ops in prop::collection::vec(op(), 1..80), blocks in 1usize..24, bs in 1usize..6) {
        run(&ops, blocks, bs, true)?;
    }

    #[test]
    fn without_forks_memory_is_the_sum_of_lengths(ops in prop::collection::vec(op(), 1..80), blocks in 1usize..24, bs in 1usize..6) {
        run(&ops, blocks, bs, false)?;
    }
}

#[test]
fn eight_sequences_of_different_lengths_use_blocks_for_their_tokens_only() {
    let lens = [16, 40, 64, 100, 128, 256, 384, 512];
    let mut kv = PagedKv::new(1024, 16).unwrap();
    for &l in &lens {
        let id = kv.add_sequence();
        for _ in 0..l {
            kv.append(id).unwrap();
        }
    }
    let total: usize = lens.iter().map(|l: &usize| l.div_ceil(16)).sum();
    assert_eq!(kv.used_blocks(), total); // 95 blocks, against 8 x 32 = 256 for B x max length
    assert!(kv.used_blocks() * 2 < 8 * 512 / 16);
}
