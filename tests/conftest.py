"""Every test process sees 8 simulated CPU devices (the sharding tests build meshes over them;
other tests run on the first, as before). Set before any JAX computation starts its backends."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
