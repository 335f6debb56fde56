//! Embeds the model registry (`models/*.toml` and the label lists they name) into the binary,
//! so `diracnet` runs from any directory. Adding a model is adding a file to `models/`.

use std::{env, fmt::Write as _, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-changed=models");
    let dir = Path::new("models");
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("models/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    let mut code = String::from("/// Files of `models/`, embedded at build time: (file name, contents).\npub(crate) static EMBEDDED: &[(&str, &str)] = &[\n");
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name");
        if !(name.ends_with(".toml") || name.ends_with(".txt")) {
            continue;
        }
        let abs = fs::canonicalize(&path).expect("canonical path");
        writeln!(
            code,
            "    ({name:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    let out = Path::new(&env::var("OUT_DIR").expect("OUT_DIR")).join("registry_files.rs");
    fs::write(out, code).expect("write registry_files.rs");
}
