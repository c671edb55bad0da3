//! `quva-ca`: the CA daemon binary.

fn main() {}
