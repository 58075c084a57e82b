fn main() {
    synthrank::allocator::keep_freed_memory();
    std::process::exit(synthrank::cli::main());
}
