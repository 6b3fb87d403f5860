// Registration of the oneDNN classes, in one place so that OneDnnChain is registered
// before BlockLoop, whose methods take OneDnnChains (the order within one translation
// unit is defined; across units it is the link order).
#include "block_loop.h"
#include "../convolution/chain.h"

namespace dynexec {

int64_t onednn_version() { return onednn::version(); }
int64_t onednn_plan_count() { return onednn::plan_count(); }
std::vector<std::string> onednn_plan_impls() { return onednn::plan_impls(); }

}  // namespace dynexec

TORCH_LIBRARY_FRAGMENT(dynexec, m) {
  using dynexec::OneDnnChain;
  m.class_<OneDnnChain>("OneDnnChain")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<int64_t>, bool>())
      .def("forward", &OneDnnChain::forward)
      .def("add_", &OneDnnChain::add_)
      .def("add_relu_", &OneDnnChain::add_relu_)
      .def("add_relu_pool_", &OneDnnChain::add_relu_pool_)
      .def("rows_add_relu_", &OneDnnChain::rows_add_relu_)
      .def("rows_add_relu_pool_", &OneDnnChain::rows_add_relu_pool_)
      .def("num_convs", &OneDnnChain::num_convs)
      .def("enable_winograd", &OneDnnChain::enable_winograd)
      .def("winograd_convs", &OneDnnChain::winograd_convs);
  using dynexec::BlockLoop;
  m.class_<BlockLoop>("BlockLoop")
      .def(torch::init<>())
      .def("add_block", &BlockLoop::add_block)
      .def("set_recurrent_gate", &BlockLoop::set_recurrent_gate)
      .def("num_blocks", &BlockLoop::num_blocks)
      .def("set_shards", &BlockLoop::set_shards)
      .def("shards", &BlockLoop::shards)
      .def("shards_for", &BlockLoop::shards_for)
      .def("set_work_sharing", &BlockLoop::set_work_sharing)
      .def("work_sharing", &BlockLoop::work_sharing)
      .def("set_stem", &BlockLoop::set_stem)
      .def("set_head", &BlockLoop::set_head)
      .def("set_policy", &BlockLoop::set_policy)
      .def("set_decision_rule", &BlockLoop::set_decision_rule)
      .def("has_stem", &BlockLoop::has_stem)
      .def("has_head", &BlockLoop::has_head)
      .def("has_policy", &BlockLoop::has_policy)
      .def("has_recurrent_gate", &BlockLoop::has_recurrent_gate)
      .def("forward", &BlockLoop::forward);
}
