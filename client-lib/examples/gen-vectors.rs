//! Writes the Quva v1 test vectors (PROTOCOL.md §10) to standard output:
//! `cargo run -p quva-client --example gen-vectors > tests/vectors/quva-v1.json`

#[path = "../tests/support/vectors.rs"]
mod vectors;

fn main() {
    let json = vectors::generate();
    match serde_json::to_string_pretty(&json) {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("error: cannot render the vectors: {e}");
            std::process::exit(1);
        }
    }
}
