#[global_allocator]
static ALLOCATOR: synthrank::allocator::TensorAllocator =
    synthrank::allocator::TensorAllocator::new();

fn main() {
    synthrank::allocator::keep_freed_memory();
    std::process::exit(synthrank::cli::main());
}
