//! Writes the seed corpus: one directory per fuzz target under `fuzz/seeds/`, holding the valid
//! encodings that `quva_client::__fuzz::seeds` builds (messages of every option and direction,
//! enrollment and CONNECT data, group-key requests and deliveries, rekey notices, a CA record).
//!
//! Run from the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example write_seeds`.

use std::collections::BTreeMap;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (target, input) in quva_client::__fuzz::seeds() {
        let n = count.entry(target).or_default();
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{n}")), &input)?;
        *n += 1;
    }
    for (target, n) in &count {
        println!("{target}: {n} seeds");
    }
    Ok(())
}
