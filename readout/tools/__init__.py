"""Tools over the wings: the benchmarks, the demo, the teacher maps, training the synthetic classifier,
the Relevance-IBA comparison and the data CLIs.
Nothing in the library, training or evaluation imports them."""
