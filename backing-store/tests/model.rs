//! Random operation sequences against an in-memory model, for every engine with and without
//! O_DIRECT: after each operation, reads must match the model byte for byte.

use backing_store::{BackingStore, EngineKind, ErrorKind, OpenOptions};
use bytes::Bytes;
use proptest::prelude::*;

const SIZE_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8, fua: bool },
    Read { offset: u64, len: usize },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
    Resize { size_bytes: u64 },
}

/// Offsets biased towards block boundaries (what initiators send) and sometimes past the end.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..SIZE_BYTES / 4096).prop_map(|block| block * 4096),
        (0..SIZE_BYTES / 512).prop_map(|sector| sector * 512),
        0..SIZE_BYTES + 8192,
    ]
}

fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        (1usize..16).prop_map(|blocks| blocks * 4096),
        (1usize..64).prop_map(|s| s * 512),
        0usize..70000
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(), len(), any::<u8>(), any::<bool>())
            .prop_map(|(offset, len, seed, fua)| Op::Write { offset, len, seed, fua }),
        3 => (offset(), len()).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => (offset(), len()).prop_map(|(offset, len)| Op::Discard { offset, len: len as u64 }),
        1 => (offset(), len()).prop_map(|(offset, len)| Op::WriteZeroes { offset, len: len as u64 }),
        1 => Just(Op::Flush),
        1 => (1..SIZE_BYTES / 512 * 2).prop_map(|sectors| Op::Resize { size_bytes: sectors * 512 }),
    ]
}

fn index(value: u64) -> usize {
    usize::try_from(value).expect("test sizes fit in usize")
}

fn data(seed: u8, len: usize) -> Bytes {
    (0..len).map(|index| seed.wrapping_add(u8::try_from(index % 251).expect("below 251"))).collect()
}

/// Applies the operations to the store and the model; returns a description of the first
/// divergence.
async fn check(store: &BackingStore, ops: &[Op]) -> Result<(), String> {
    let mut model = vec![0u8; index(SIZE_BYTES)];
    for (step, op) in ops.iter().enumerate() {
        let size = model.len() as u64;
        let in_range =
            |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);
        let result = match op {
            Op::Write { offset, len, seed, fua } => {
                let bytes = data(*seed, *len);
                let result = store.write(*offset, bytes.clone(), *fua).await;
                if result.is_ok() {
                    let start = index(*offset);
                    model[start..start + len].copy_from_slice(&bytes);
                }
                result.map(|()| in_range(*offset, *len as u64))
            }
            Op::Read { offset, len } => match store.read(*offset, *len).await {
                Ok(read) => {
                    let start = index(*offset);
                    if read[..] != model[start..start + len] {
                        return Err(format!("step {step}: {op:?} differs from the model"));
                    }
                    Ok(in_range(*offset, *len as u64))
                }
                Err(error) => Err(error),
            },
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                let result = if matches!(op, Op::Discard { .. }) {
                    store.discard(*offset, *len).await
                } else {
                    store.write_zeroes(*offset, *len).await
                };
                if result.is_ok() {
                    let start = index(*offset);
                    model[start..start + index(*len)].fill(0);
                }
                result.map(|()| in_range(*offset, *len))
            }
            Op::Flush => store.flush().await.map(|()| true),
            Op::Resize { size_bytes } => {
                let result = store.resize(*size_bytes).await;
                if result.is_ok() {
                    model.resize(index(*size_bytes), 0);
                }
                result.map(|()| true)
            }
        };
        match result {
            Ok(true) => {}
            Ok(false) => return Err(format!("step {step}: {op:?} out of range but accepted")),
            Err(error) if error.kind() == ErrorKind::OutOfRange => {
                if !matches!(op, Op::Flush | Op::Resize { .. }) {
                    let (offset, len) = match op {
                        Op::Write { offset, len, .. } | Op::Read { offset, len } => {
                            (*offset, *len as u64)
                        }
                        Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                            (*offset, *len)
                        }
                        _ => unreachable!(),
                    };
                    if in_range(offset, len) {
                        return Err(format!("step {step}: {op:?} in range but rejected: {error}"));
                    }
                }
            }
            Err(error) => return Err(format!("step {step}: {op:?} failed: {error}")),
        }
        if store.size_bytes() != model.len() as u64 {
            return Err(format!(
                "step {step}: size {} != model {}",
                store.size_bytes(),
                model.len()
            ));
        }
    }
    let everything = store.read(0, model.len()).await.map_err(|error| error.to_string())?;
    if everything[..] != model[..] {
        return Err("final content differs from the model".to_owned());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn engines_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        for (engine, direct_io, inline) in [
            (EngineKind::Sync, false, false),
            (EngineKind::Sync, false, true),
            (EngineKind::Sync, true, true),
            (EngineKind::Uring, false, false),
            (EngineKind::Uring, false, true),
            (EngineKind::Uring, true, true),
        ] {
            let directory = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
            let path = directory.path().join("model.img");
            let options = OpenOptions { engine, direct_io, create_size_bytes: Some(SIZE_BYTES), read_only: false };
            let store = BackingStore::open(&path, &options).expect("open");
            store.set_inline_io(inline);
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let outcome = runtime.block_on(check(&store, &ops));
            prop_assert!(outcome.is_ok(), "engine={} direct_io={} inline={}: {}", engine, direct_io, inline, outcome.unwrap_err());
        }
    }
}
