fn main() {
    std::process::exit(synthrank::cli::main());
}
