// Registration of torch.classes.dynexec.OneDnnChain (csrc/onednn/chain.h).
#include "chain.h"

namespace dynexec {

int64_t onednn_version() { return onednn::version(); }

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
      .def("num_convs", &OneDnnChain::num_convs);
}
