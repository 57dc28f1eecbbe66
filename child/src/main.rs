//! The stock agent: only the built-in functions. Masters name it as their agent image with
//! `LocalOptions::program`. Run by hand it explains itself and exits.

fn main() {
    mitogen_child::run_if_child(mitogen_child::Registry::new());
    eprintln!(
        "mitogen-agent {}: this program is started by a mitogen master, not by hand.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
