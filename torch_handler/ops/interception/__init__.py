"""Running the op rules inside an explained model's forward.

* :mod:`.context`: the explanation context and the process-wide module hooks that enter the
  function mode for the explained model's own forward only;
* :mod:`.function_mode`: the ``TorchFunctionMode`` that hands every torch call to its handler;
* :mod:`.calls`: how a call of an op with a rule is read (the readers the op table names);
* :mod:`.tracking`: following the doubled batch through linear and shape ops;
* :mod:`.function`: the autograd Function every ruled op runs (the rule in its backward);
* :mod:`.batch_axis`: where the doubled batch sits in a tensor, and how ops move it.
"""
