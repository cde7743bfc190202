//! The `ml-worker` command line ([`ml_worker::cli`]) with the built-in model kinds.

fn main() {
    ml_worker::cli::main(ml_worker::registry::RegistryBuilder::new())
}
