fn main() {
    print!("{}", discus::crds::render_yaml().unwrap());
}
