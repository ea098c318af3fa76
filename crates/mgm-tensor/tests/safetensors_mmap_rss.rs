//! Zero-copy proof: loading a 1 GiB safetensors file must not grow the process's peak resident
//! memory by anything near 1 GiB. This file is its own test binary, so its own process, and
//! holds a single test, so no other test's allocations disturb the measurement.
use std::io::{Seek, SeekFrom, Write};

use mgm_tensor::safetensors::SafeTensorsFile;

const NUMEL: usize = 1 << 28; // 2^28 f32 = 1 GiB
/// The elements written and read back: both ends, the middle, and a few between.
const PROBES: [usize; 8] = [
    0,
    1,
    12345,
    NUMEL / 2 - 1,
    NUMEL / 2,
    NUMEL / 2 + 7,
    NUMEL - 2,
    NUMEL - 1,
];
const MIB: u64 = 1 << 20;

/// A kB field (`VmHWM`, `VmRSS`) of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status is readable on Linux");
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

fn value(i: usize) -> f32 {
    // distinct, nonzero (a hole reads as 0) and exactly representable
    1.0 + (i % (1 << 20)) as f32 + (i >> 20) as f32 * 0.5
}

#[test]
fn loading_1gib_file_does_not_copy_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    {
        let header = format!(
            r#"{{"big":{{"dtype":"F32","shape":[{NUMEL}],"data_offsets":[0,{}]}}}}"#,
            NUMEL * 4
        );
        let mut h = header.into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        // The file is sparse: only the pages holding the probed elements are written, the rest
        // is a hole that reads as zeros. A 1 GiB file then costs a few KiB of disk (CI machines
        // can be short of it), while a loader that copied the data would still have to touch
        // and allocate the whole GiB.
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        let data_start = 8 + h.len() as u64;
        f.set_len(data_start + (NUMEL * 4) as u64).unwrap();
        for i in PROBES {
            f.seek(SeekFrom::Start(data_start + (i * 4) as u64))
                .unwrap();
            f.write_all(&value(i).to_le_bytes()).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        8 + header_len(&path) + NUMEL * 4
    );

    let hwm_before = status_bytes("VmHWM:");
    let rss_before = status_bytes("VmRSS:");
    let f = SafeTensorsFile::open(&path).unwrap();
    let t = f.get("big").unwrap();
    assert_eq!(t.shape(), &[NUMEL]);
    assert!(t.cpu_storage().is_mapped());
    for i in PROBES {
        let got = t.narrow(0, i, 1).unwrap().to_vec::<f32>().unwrap()[0];
        assert_eq!(got, value(i), "element {i}");
    }
    let hwm_after = status_bytes("VmHWM:");
    let rss_after = status_bytes("VmRSS:");
    let grew = hwm_after
        .saturating_sub(hwm_before)
        .max(rss_after.saturating_sub(rss_before));
    assert!(
        grew < 64 * MIB,
        "loading a 1 GiB file grew resident memory by {} MiB (peak {} -> {} MiB): the data was copied",
        grew / MIB,
        hwm_before / MIB,
        hwm_after / MIB
    );
    drop(t);
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

fn header_len(path: &std::path::Path) -> usize {
    let mut b = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open(path).unwrap(), &mut b).unwrap();
    u64::from_le_bytes(b) as usize
}
